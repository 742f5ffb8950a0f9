"""The project's one user-input error type.

Every error caused by what a user gave (a config key, a flag, a path, a file's contents) is a
`UserInputError` whose message is one line that names the bad value and what is allowed. The
command-line tools catch only this type, so an internal bug still shows its traceback.
"""


class UserInputError(ValueError):
  """Bad user input, named precisely: the value, where it came from, and what is allowed."""
