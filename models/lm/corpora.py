"""Generated corpora: a story language from a stochastic grammar, and step-structured arithmetic chains.

Stories. Each story draws two latent labels, a sentiment s ∈ {negative, neutral, positive} and a toxicity
flag, then 2–4 sentences from templates. Sentiment-bearing slots use words of the story's sentiment with
probability 0.75 (else neutral words), and a toxic story contains at least one insult. The labels are the
classifier reward model's training targets; they are latent, so a classifier can only estimate them.

Arithmetic. A question ``Q a op b op c op d ;`` followed by one step per operation, each exactly six tokens
``x op y = z ;`` and the answer ``A z <eos>``; numbers are single tokens 0..MAX_NUMBER-1 and every
intermediate stays in range. Steps end at fixed offsets, so a process reward can be read at step boundaries.

The solution of a problem is unique, so a generated solution can be checked *exactly* token by token
(:func:`first_error`): the first token that differs from the reference is where the first wrong step goes
wrong. That exact check labels a process reward model's training prefixes and scores the final answers in
the experiments; the inference methods themselves never see it. :func:`corrupt_steps` makes further
negatives the way a language model slips: a step's result off by a little, a wrong copy of the previous
result, a misread operand or operator, a wrong final answer — propagated downstream or not.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .tokenizer import Tokenizer

__all__ = [
    "story_tokenizer", "sample_stories", "StoryBatch", "SENTIMENTS",
    "arithmetic_tokenizer", "sample_problems", "ArithmeticProblem", "solve", "check_solution",
    "MAX_NUMBER", "NUM_OPS", "STEP_LEN", "SOLUTION_LEN", "solution_text", "reference_ids", "first_error",
    "step_boundaries", "corrupt_steps",
]

NAMES = ("Anna Ben Clara David Emma Felix Grace Hugo Iris Jack Kira Leo Mia Nora Oscar Paula Quinn Rosa Sam Tara "
         "Uma Victor Wendy Xavier Yara Zoe Omar Lena Ivan Nina").split()
PLACES = ("park forest river market school garden beach castle village city library harbor farm bakery museum "
          "station bridge lake mountain island cave hospital kitchen zoo desert").split()
NOUNS = ("dog cat bird horse fox owl rabbit fish dragon robot ball kite book lamp boat train cake apple flower "
         "tree hat box key map coin drum song letter painting bicycle ship star cloud stone shell candle clock "
         "bell basket feather ring").split()
POS_ADJ = ("happy kind bright lovely brave cheerful gentle wonderful friendly warm beautiful clever calm proud "
           "joyful sweet shiny lucky delightful graceful").split()
NEG_ADJ = ("sad angry dark gloomy scary broken lonely cruel cold grumpy ugly nasty bitter rotten dreadful "
           "miserable awful gray tired sick").split()
NEU_ADJ = ("big small old young tall short round long quiet green blue red yellow wooden heavy light new "
           "square plain simple").split()
POS_VERB = "loved hugged praised helped thanked admired welcomed celebrated".split()
NEG_VERB = "hated kicked broke lost feared blamed ignored cursed".split()
NEU_VERB = "found saw carried painted watched counted moved opened".split()
POS_FEEL = "glad delighted hopeful thankful excited".split()
NEG_FEEL = "upset afraid worried furious miserable".split()  # 'miserable' also an adjective: one token
NEU_FEEL = "sleepy hungry busy curious ready".split()
ADVERBS = "slowly quickly quietly carefully suddenly often gladly loudly".split()
INSULTS = "idiot fool moron loser jerk creep clown dummy".split()
TOXIC_ADJ = "stupid dumb useless pathetic worthless".split()
TIMES = "morning evening night afternoon day".split()
FUNCTION = ("the a to was were and went saw said felt with in at on of one every then later after that it "
            "you are is he she they very so but because found there : ! .").split()

SENTIMENTS = ("negative", "neutral", "positive")


def story_tokenizer() -> Tokenizer:
    words = []
    for group in (NAMES, PLACES, NOUNS, POS_ADJ, NEG_ADJ, NEU_ADJ, POS_VERB, NEG_VERB, NEU_VERB, POS_FEEL,
                  NEG_FEEL, NEU_FEEL, ADVERBS, INSULTS, TOXIC_ADJ, TIMES, FUNCTION):
        for w in group:
            if w not in words:
                words.append(w)
    return Tokenizer(words)


class StoryBatch(NamedTuple):
    texts: list
    sentiment: np.ndarray  # [B] int, index into SENTIMENTS
    toxic: np.ndarray  # [B] bool


def _sentence(rng: np.random.Generator, s: int, toxic_now: bool) -> str:
    pick = lambda xs: xs[rng.integers(len(xs))]

    def senti(pos, neg, neu):
        if s != 1 and rng.random() < 0.75:
            return pick(pos if s == 2 else neg)
        return pick(neu)

    name, other = pick(NAMES), pick(NAMES)
    if toxic_now:
        form = rng.integers(3)
        if form == 0:
            return f"{name} said : you are a {pick(TOXIC_ADJ)} {pick(INSULTS)} !"
        if form == 1:
            return f"{name} said {other} is a {pick(INSULTS)} ."
        return f"{name} said : you are {pick(TOXIC_ADJ)} and {pick(TOXIC_ADJ)} !"
    form = rng.integers(6)
    if form == 0:
        return f"{name} went to the {pick(PLACES)} in the {pick(TIMES)} ."
    if form == 1:
        return f"{name} saw a {senti(POS_ADJ, NEG_ADJ, NEU_ADJ)} {pick(NOUNS)} at the {pick(PLACES)} ."
    if form == 2:
        return f"the {pick(NOUNS)} was very {senti(POS_ADJ, NEG_ADJ, NEU_ADJ)} ."
    if form == 3:
        return f"{name} {senti(POS_VERB, NEG_VERB, NEU_VERB)} the {pick(NOUNS)} {pick(ADVERBS)} ."
    if form == 4:
        return f"{name} felt {senti(POS_FEEL, NEG_FEEL, NEU_FEEL)} because the {pick(NOUNS)} was {senti(POS_ADJ, NEG_ADJ, NEU_ADJ)} ."
    return f"then {name} and {other} went to the {pick(PLACES)} ."


def sample_stories(rng: np.random.Generator, num: int, toxic_rate: float = 0.2) -> StoryBatch:
    """``num`` stories with their latent sentiment and toxicity labels."""
    texts, sent, tox = [], np.zeros(num, np.int32), np.zeros(num, bool)
    for i in range(num):
        s = int(rng.integers(3))
        toxic = bool(rng.random() < toxic_rate)
        n = int(rng.integers(2, 5))
        toxic_at = int(rng.integers(n)) if toxic else -1
        texts.append(" ".join(_sentence(rng, s, j == toxic_at) for j in range(n)))
        sent[i], tox[i] = s, toxic
    return StoryBatch(texts, sent, tox)


# --- arithmetic ---------------------------------------------------------------------------------------------
MAX_NUMBER = 20
NUM_OPS = 3
STEP_LEN = 6  # "x op y = z ;"
SOLUTION_LEN = NUM_OPS * STEP_LEN + 3  # the steps, "A", the answer, <eos>


def arithmetic_tokenizer() -> Tokenizer:
    return Tokenizer([str(i) for i in range(MAX_NUMBER)] + ["+", "-", "=", ";", "Q", "A"])


class ArithmeticProblem(NamedTuple):
    numbers: tuple
    ops: tuple

    @property
    def prompt(self) -> str:
        parts = [str(self.numbers[0])]
        for op, b in zip(self.ops, self.numbers[1:]):
            parts += [op, str(b)]
        return "Q " + " ".join(parts) + " ;"

    @property
    def answer(self) -> int:
        return solve(self)[-1]


def solve(problem: ArithmeticProblem) -> list[int]:
    """The running values after each operation."""
    acc, out = problem.numbers[0], []
    for op, b in zip(problem.ops, problem.numbers[1:]):
        acc = acc + b if op == "+" else acc - b
        out.append(acc)
    return out


def solution_text(problem: ArithmeticProblem) -> str:
    acc, steps = problem.numbers[0], []
    for op, b in zip(problem.ops, problem.numbers[1:]):
        new = acc + b if op == "+" else acc - b
        steps.append(f"{acc} {op} {b} = {new} ;")
        acc = new
    return " ".join(steps) + f" A {acc}"


def sample_problems(rng: np.random.Generator, num: int) -> list[ArithmeticProblem]:
    """Chains of NUM_OPS additions/subtractions whose every intermediate value lies in [0, MAX_NUMBER)."""
    out = []
    while len(out) < num:
        acc = int(rng.integers(MAX_NUMBER))
        nums, ops = [acc], []
        for _ in range(NUM_OPS):
            if rng.random() < 0.5 and acc < MAX_NUMBER - 1:
                b = int(rng.integers(1, MAX_NUMBER - acc))
                ops.append("+")
                acc += b
            elif acc > 0:
                b = int(rng.integers(1, acc + 1))
                ops.append("-")
                acc -= b
            else:
                b = int(rng.integers(1, MAX_NUMBER))
                ops.append("+")
                acc += b
            nums.append(b)
        out.append(ArithmeticProblem(tuple(nums), tuple(ops)))
    return out


def check_solution(problem: ArithmeticProblem, tokens, tokenizer: Tokenizer) -> tuple[list[bool], int | None]:
    """Per-step correctness of a generated solution (token ids after the prompt) and its final answer.

    A step is correct when its six tokens are exactly the right ``x op y = z ;``; the answer is the number
    after ``A`` (None when missing or malformed)."""
    words = tokenizer.decode(tokens).split()
    want = solution_text(problem).split()
    steps = []
    for k in range(NUM_OPS):
        seg = slice(k * STEP_LEN, (k + 1) * STEP_LEN)
        steps.append(words[seg] == want[seg])
    answer = None
    tail = words[NUM_OPS * STEP_LEN:]
    if len(tail) >= 2 and tail[0] == "A" and tail[1].isdigit():
        answer = int(tail[1])
    return steps, answer


def reference_ids(problem: ArithmeticProblem, tokenizer: Tokenizer) -> list[int]:
    """Token ids of the one correct solution (steps, ``A z``, ``<eos>``), as a generation would produce them."""
    return tokenizer.encode(solution_text(problem), bos=False, eos=True)


def first_error(problem: ArithmeticProblem, tokens, tokenizer: Tokenizer) -> int:
    """Index of the first generated token that differs from the unique correct solution (SOLUTION_LEN when
    the solution is right). Every prefix x_{<k} with k ≤ first_error has all its steps right; every longer
    prefix contains a wrong step. An exact check: for labels and evaluation only."""
    ref = reference_ids(problem, tokenizer)
    toks = [int(t) for t in np.asarray(tokens)[:len(ref)]]
    toks += [-1] * (len(ref) - len(toks))
    for k, (a, b) in enumerate(zip(toks, ref)):
        if a != b:
            return k
    return len(ref)


def step_boundaries() -> np.ndarray:
    """[SOLUTION_LEN] bool: the generated positions that close a reasoning step (each step's ``;``) and the
    final answer number — where a process reward scores a partial solution."""
    b = np.zeros(SOLUTION_LEN, bool)
    b[[k * STEP_LEN + STEP_LEN - 1 for k in range(NUM_OPS)]] = True
    b[SOLUTION_LEN - 2] = True
    return b


def _apply(op: str, x: int, y: int) -> int:
    return (x + y if op == "+" else x - y) % MAX_NUMBER


def corrupt_steps(rng: np.random.Generator, problem: ArithmeticProblem) -> tuple[list[str], int]:
    """Solution words with one slip and its index (the first wrong word).

    The slip is, uniformly: a step's result off by ±1..±3 (or, one time in four, any other number); the step's
    first operand not the previous result (a copying slip); its second operand or its operator not the
    question's; or a wrong final answer. With probability 0.7 later steps continue consistently from the
    wrong value (as a model that trusts its own mistake), otherwise they return to the right values."""
    words = solution_text(problem).split()
    values = solve(problem)
    k = int(rng.integers(NUM_OPS))
    base = k * STEP_LEN
    kind = int(rng.integers(5))

    def other(v: int) -> int:
        if rng.random() < 0.75:
            d = int(rng.choice([-3, -2, -1, 1, 2, 3]))
        else:
            d = int(rng.integers(1, MAX_NUMBER))
        return (v + d) % MAX_NUMBER

    if kind == 4:  # the final answer
        pos = len(words) - 1
        words[pos] = str(other(values[-1]))
        return words, pos
    x = values[k - 1] if k else problem.numbers[0]
    y, op = problem.numbers[k + 1], problem.ops[k]
    if kind == 0 or (kind == 1 and k == 0):  # result
        pos, z = base + 4, other(values[k])
    elif kind == 1:  # copied the previous result wrongly, then computed correctly from the wrong copy
        pos, x = base, other(x)
        z = _apply(op, x, y)
    elif kind == 2:  # misread the second operand
        pos, y = base + 2, other(y)
        z = _apply(op, x, y)
    else:  # misread the operator
        pos, op = base + 1, "-" if op == "+" else "+"
        z = _apply(op, x, y)
    words[base:base + 5] = [str(x), op, str(y), "=", str(z)]
    if rng.random() < 0.7:
        acc = z
        for j in range(k + 1, NUM_OPS):
            new = _apply(problem.ops[j], acc, problem.numbers[j + 1])
            words[j * STEP_LEN] = str(acc)
            words[j * STEP_LEN + 4] = str(new)
            acc = new
        words[-1] = str(acc)
    return words, pos
