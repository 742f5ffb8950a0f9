"""The answer metrics of the generative tasks: a decoded prediction against the references.

  drop              DROP exact match and F1 (the official DROP answer normalization and bag alignment)
  vqa               VQA accuracy: min(#matching humans / 3, 1), averaged over the 10 leave-one-out
                    subsets of the references, after the official VQA answer normalization
  exact_match       normalized prediction equals a reference (TallyQA, GQA)
  anls              average normalized Levenshtein similarity, threshold 0.5 (DocVQA)
  relaxed_accuracy  numbers within 5 % of the reference, else exact match (ChartQA)

Plain Python on strings, apart from the DROP bag alignment (scipy's linear_sum_assignment).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import scipy.optimize


# ---------------------------------------------------------------------------------------------
# DROP (exact match and F1 with the official answer normalization and multi-span bag alignment).


def _is_number(text: str) -> bool:
  try:
    float(text)
  except ValueError:
    return False
  return True


def drop_normalize(text: str) -> str:
  """Lowercase; drop punctuation (not inside numbers), articles and extra spaces; numbers as floats."""
  parts = []
  for token in re.split(" |-", text):
    token = token.lower()
    if not _is_number(token):
      token = "".join(ch for ch in token if ch not in string.punctuation)
    if _is_number(token):
      token = str(float(token))
    token = " ".join(re.sub(r"\b(a|an|the)\b", " ", token).split())
    if token.strip():
      parts.append(token)
  return " ".join(parts).strip()


def _bag_f1(predicted: set[str], gold: set[str]) -> float:
  common = len(gold & predicted)
  precision = common / len(predicted) if predicted else 1.0
  recall = common / len(gold) if gold else 1.0
  return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _numbers_agree(gold: set[str], predicted: set[str]) -> bool:
  """A gold span with numbers only counts when the prediction shares one of them."""
  gold_numbers = {w for w in gold if _is_number(w)}
  return not gold_numbers or bool(gold_numbers & {w for w in predicted if _is_number(w)})


def drop_em_f1(prediction: str | Sequence[str], gold: str | Sequence[str]) -> tuple[float, float]:
  """(exact match, F1) of one prediction against one gold answer; each a span or a list of spans.

  Spans are matched one-to-one by the assignment that maximizes the summed F1 (scipy's
  linear_sum_assignment); F1 is averaged over max(#gold, #predicted) spans and rounded to 2 places.
  """
  pred_spans = [prediction] if isinstance(prediction, str) else list(prediction)
  gold_spans = [gold] if isinstance(gold, str) else list(gold)
  pred_norm = [drop_normalize(s) for s in pred_spans]
  gold_norm = [drop_normalize(s) for s in gold_spans]
  exact = float(sorted(set(pred_norm)) == sorted(set(gold_norm)) and len(pred_norm) == len(gold_norm))
  pred_bags = [set(s.split()) for s in pred_norm]
  gold_bags = [set(s.split()) for s in gold_norm]
  scores = np.zeros((len(gold_bags), len(pred_bags)))
  for g, gold_bag in enumerate(gold_bags):
    for p, pred_bag in enumerate(pred_bags):
      if _numbers_agree(gold_bag, pred_bag):
        scores[g, p] = _bag_f1(pred_bag, gold_bag)
  rows, cols = scipy.optimize.linear_sum_assignment(-scores)
  best = np.zeros(max(len(gold_bags), len(pred_bags)))
  for r, c in zip(rows, cols):
    best[r] = max(best[r], scores[r, c])
  return exact, round(float(np.mean(best)), 2)


def drop_metrics(prediction: str, answers: Sequence[str]) -> tuple[float, float]:
  """(EM, F1) against the best of several gold answers (DROP's validated answers)."""
  pairs = [drop_em_f1(prediction, gold) for gold in answers]
  return max(p[0] for p in pairs), max(p[1] for p in pairs)


# ---------------------------------------------------------------------------------------------
# VQA accuracy and the other short-answer metrics.

_VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "shant": "shan't", "shed": "she'd",
    "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "somebodys": "somebody's",
    "someones": "someone's", "somethings": "something's", "thats": "that's", "thered": "there'd",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "wasnt": "wasn't", "wed": "we'd", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_VQA_ARTICLES = {"a", "an", "the"}
_VQA_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                    "?", "!"]  # fmt: skip
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def vqa_normalize(answer: str) -> str:
  """The VQA evaluation's answer normalization: punctuation, digits for number words, no articles,
  standard contractions (the official script's rules)."""
  text = answer.replace("\n", " ").replace("\t", " ").strip()
  for p in _VQA_PUNCTUATION:
    if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
      text = text.replace(p, "")
    else:
      text = text.replace(p, " ")
  text = _PERIOD_STRIP.sub("", text)
  words = []
  for word in text.lower().split():
    word = _VQA_NUMBERS.get(word, word)
    if word not in _VQA_ARTICLES:
      words.append(_VQA_CONTRACTIONS.get(word, word))
  return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """VQA accuracy: mean over each reference left out of min(#other references == prediction / 3, 1)."""
  if not answers:
    raise ValueError("VQA accuracy needs at least one reference answer")
  pred = vqa_normalize(prediction)
  gold = [vqa_normalize(a) for a in answers]
  if len(gold) == 1:
    return float(pred == gold[0])
  matches = np.array([g == pred for g in gold])
  return float(np.mean([min(1.0, (matches.sum() - m) / 3.0) for m in matches]))


def exact_match(prediction: str, answers: Sequence[str]) -> float:
  """1 if the normalized prediction equals a normalized reference (VQA normalization)."""
  return float(vqa_normalize(prediction) in {vqa_normalize(a) for a in answers})


def _levenshtein(a: str, b: str) -> int:
  previous = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    current = [i]
    for j, cb in enumerate(b, 1):
      current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
    previous = current
  return previous[-1]


def anls(prediction: str, answers: Sequence[str], *, threshold: float = 0.5) -> float:
  """Normalized Levenshtein similarity to the closest reference, 0 below `threshold` (DocVQA)."""
  pred = " ".join(prediction.lower().split())
  best = 0.0
  for answer in answers:
    gold = " ".join(answer.lower().split())
    distance = _levenshtein(pred, gold) / max(len(pred), len(gold), 1)
    best = max(best, 1.0 - distance if distance < threshold else 0.0)
  return best


def relaxed_accuracy(prediction: str, answers: Sequence[str], *, tolerance: float = 0.05) -> float:
  """ChartQA: a number within `tolerance` (relative) of a numeric reference, else exact match."""

  def number(text: str) -> float | None:
    text = text.strip().rstrip("%").replace(",", "")
    return float(text) if _is_number(text) else None

  pred_number = number(prediction)
  for answer in answers:
    gold_number = number(answer)
    if pred_number is not None and gold_number is not None and gold_number != 0:
      if abs(pred_number - gold_number) / abs(gold_number) <= tolerance:
        return 1.0
    elif prediction.strip().lower() == answer.strip().lower():
      return 1.0
  return 0.0


GENERATIVE_METRICS: Mapping[str, Callable[[str, Sequence[str]], float]] = {
    "vqa": vqa_accuracy, "exact_match": exact_match, "anls": anls, "relaxed_accuracy": relaxed_accuracy,
}  # fmt: skip
