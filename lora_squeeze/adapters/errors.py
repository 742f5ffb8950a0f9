"""The one error type of the adapter tools: bad input, named precisely."""

from lora_squeeze.errors import UserInputError


class AdapterError(UserInputError):
  """An adapter (or a path given for one) that cannot be read, squeezed or written.

  The message names the file and, where there is one, the tensor or module at fault.
  """
