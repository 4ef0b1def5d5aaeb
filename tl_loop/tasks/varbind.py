"""Multi-hop variable binding: a task where iterating helps and the mechanism is known.

A prompt is a shuffled list of assignments followed by a query::

    <bos>q=4;k=t;t=x;c=q;x=9;m=c;k?     ->  9      (k -> t -> x -> 9: 3 hops)

Every variable is assigned exactly once, either a digit (the *root* of a chain) or another
variable. The statements form disjoint chains ``v_L = v_{L-1}; ...; v_2 = v_1; v_1 = D``; every
chain has its own digit, so the answer names the chain. The query asks for the value of a variable
``k`` links away from its root: answering means following ``k`` links (``hops``), searching the
shuffled statements at every link. Distractor chains have the same statistics as the queried one,
and the queried chain may continue past the queried variable.

Layout (``VarBindTask.n_statements`` statements of 4 characters, fixed length for every problem)::

    position 0                  <bos>
    1 + 4 i .. 1 + 4 i + 3      statement i: lhs, "=", rhs, ";"
    1 + 4 n                     the queried variable
    2 + 4 n                     "?"  -- the logits here predict the answer (the last prompt position)

The mechanism is exposed per problem (:class:`Mechanism`): the statements on the path from the
query to its digit, in the order they must be followed, with their token positions; everything
else is a distractor. Three corruptions build clean / corrupted pairs that differ in one token, so
activation-patching results can be checked against it:

* :func:`corrupt_root` changes the queried chain's digit (the answer changes to the new digit);
* :func:`corrupt_link` redirects the link at hop ``h`` to another chain (the answer becomes that
  chain's digit);
* :func:`corrupt_distractor` changes another chain's digit (the answer does not change).

Held-out split: a problem belongs to the test split when a hash of its prompt falls in the first
``test_fraction`` of the hash range, so train and test problems never coincide; generators reject
problems of the other split.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple

import torch

from tl_loop.tasks.tokenizer import CharTokenizer

Split = Literal["train", "test"]

VARIABLES = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
CHARS = VARIABLES + DIGITS + "=;?"


def make_tokenizer(encoding: str = "chars", variables: str = VARIABLES) -> CharTokenizer:
    """The tokenizer of the task (and of the shipped models): ``<pad> <bos> <eos> <unk>``,
    ``a``-``z``, ``0``-``9``, ``=``, ``;``, ``?`` -- 43 tokens; with the ``"statements"``
    encoding also one token per possible statement ``x=y;`` (``x`` a variable, ``y`` another
    variable or a digit).

    >>> make_tokenizer("statements").tokenize("a=7;b=a;?b")
    ['a=7;', 'b=a;', '?', 'b']
    """
    if encoding == "chars":
        return CharTokenizer(CHARS)
    if encoding != "statements":
        raise ValueError(f"unknown encoding {encoding!r}: 'chars' or 'statements'")
    words = [f"{x}={y};" for x in variables for y in variables + DIGITS if y != x]
    return CharTokenizer(CHARS, words=words)


@dataclass(frozen=True)
class Mechanism:
    """Which statements (and token positions) the answer depends on.

    ``path[h]`` is the index (in prompt order) of the statement followed at hop ``h``: ``path[0]``
    assigns the queried variable, ``path[-1]`` is the root ``v = D``. ``lhs_pos``, ``rhs_pos`` are
    the token positions (``<bos>`` at 0) of each path statement's left and right side.
    """

    path: tuple[int, ...]
    lhs_pos: tuple[int, ...]
    rhs_pos: tuple[int, ...]
    query_pos: int
    answer_pos: int  # the last prompt position: its logits predict the answer
    value_pos: int  # the position of the answer digit in the prompt (rhs of the root)
    n_positions: int  # prompt length in tokens, <bos> included
    encoding: str = "chars"  # "chars": 4 tokens per statement; "statements": one token per statement

    @property
    def hops(self) -> int:
        return len(self.path)

    @property
    def n_statements(self) -> int:
        return self.n_positions - 3 if self.encoding == "statements" else (self.n_positions - 3) // 4

    def statement_positions(self, i: int) -> tuple[int, int, int, int]:
        """Token positions of statement ``i``: (lhs, "=", rhs, ";"); with the ``"statements"``
        encoding all four are the statement's one token."""
        if self.encoding == "statements":
            return (1 + i,) * 4  # type: ignore[return-value]
        start = 1 + 4 * i
        return start, start + 1, start + 2, start + 3

    @property
    def relevant_positions(self) -> tuple[int, ...]:
        """Positions of the path statements' variables and digit, the query and the answer slot."""
        return tuple(sorted({*self.lhs_pos, *self.rhs_pos, self.query_pos, self.answer_pos}))

    @property
    def distractor_positions(self) -> tuple[int, ...]:
        """lhs / rhs positions of statements that are not on the path (changing them cannot
        change the answer, as long as every chain keeps its own digit)."""
        on_path = set(self.path)
        out: list[int] = []
        for i in range(self.n_statements):
            if i not in on_path:
                lhs, _, rhs, _ = self.statement_positions(i)
                out += [lhs, rhs] if rhs != lhs else [lhs]
        return tuple(out)

    def role(self, pos: int) -> str:
        """What position ``pos`` holds: ``"answer slot"``, ``"query"``, ``"hop h lhs"`` / ``"hop h rhs"``
        (``"hop h"`` when one token holds the statement; ``" (root digit)"`` on the root's digit),
        ``"distractor"`` or ``"other"`` (``<bos>``, ``=``, ``;``, ``?``)."""
        if pos == self.answer_pos:
            return "answer slot" + (" and query" if pos == self.query_pos else "")
        if pos == self.query_pos:
            return "query"
        for h, (lhs, rhs) in enumerate(zip(self.lhs_pos, self.rhs_pos)):
            root = " (root digit)" if pos == self.value_pos else ""
            if pos == lhs == rhs:
                return f"hop {h}{root}"
            if pos == lhs:
                return f"hop {h} lhs"
            if pos == rhs:
                return f"hop {h} rhs{root}"
        return "distractor" if pos in self.distractor_positions else "other"

    def mask(self) -> torch.Tensor:
        """Boolean ``[n_positions]``: True at :attr:`relevant_positions`."""
        m = torch.zeros(self.n_positions, dtype=torch.bool)
        m[list(self.relevant_positions)] = True
        return m


@dataclass(frozen=True)
class Problem:
    """One variable-binding problem (see the module docstring)."""

    statements: tuple[tuple[str, str], ...]  # (lhs, rhs) in prompt order
    query: str
    hops: int
    encoding: str = "chars"  # see VarBindTask.encoding

    @property
    def prompt(self) -> str:
        """The text without ``<bos>`` and without the answer: the statements, then ``"k?"``
        (``"?k"`` with the ``"statements"`` encoding, whose answer slot is the variable itself)."""
        query = f"?{self.query}" if self.encoding == "statements" else f"{self.query}?"
        return "".join(f"{lhs}={rhs};" for lhs, rhs in self.statements) + query

    @property
    def text(self) -> str:
        return self.prompt + self.answer

    def _definitions(self) -> dict[str, int]:
        return {lhs: i for i, (lhs, _) in enumerate(self.statements)}

    @property
    def path(self) -> tuple[int, ...]:
        """Statement indices followed from the query to its digit."""
        return self.path_from(self.query)

    def path_from(self, var: str) -> tuple[int, ...]:
        """Statement indices followed from ``var`` to its digit."""
        where = self._definitions()
        out = [where[var]]
        while self.statements[out[-1]][1] not in DIGITS:
            out.append(where[self.statements[out[-1]][1]])
            if len(out) > len(self.statements):
                raise ValueError("variable binding problem with a cycle")
        return tuple(out)

    @property
    def answer(self) -> str:
        return self.statements[self.path[-1]][1]

    def links(self, var: str | None = None) -> tuple[str, ...]:
        """The chain followed from ``var`` (default: the query): the right side reached after
        1, 2, ... links, ending with the digit."""
        return tuple(self.statements[i][1] for i in self.path_from(self.query if var is None else var))

    @property
    def mechanism(self) -> Mechanism:
        path = self.path
        n = len(self.statements)
        if self.encoding == "statements":
            return Mechanism(
                path=path,
                lhs_pos=tuple(1 + i for i in path),
                rhs_pos=tuple(1 + i for i in path),
                query_pos=2 + n,
                answer_pos=2 + n,
                value_pos=1 + path[-1],
                n_positions=3 + n,
                encoding="statements",
            )
        return Mechanism(
            path=path,
            lhs_pos=tuple(1 + 4 * i for i in path),
            rhs_pos=tuple(3 + 4 * i for i in path),
            query_pos=1 + 4 * n,
            answer_pos=2 + 4 * n,
            value_pos=3 + 4 * path[-1],
            n_positions=3 + 4 * n,
        )

    def chains(self) -> list[list[int]]:
        """Every chain as statement indices from its root (``v = D``) outwards."""
        users: dict[str, list[int]] = {}
        for i, (_, rhs) in enumerate(self.statements):
            users.setdefault(rhs, []).append(i)
        out = []
        for i, (lhs, rhs) in enumerate(self.statements):
            if rhs in DIGITS:
                chain = [i]
                while self.statements[chain[-1]][0] in users:
                    chain.append(users[self.statements[chain[-1]][0]][0])
                out.append(chain)
        return out

    def validate(self) -> None:
        """Raise ``ValueError`` unless every variable is assigned once, every chain ends in its
        own digit and the query is ``hops`` links from its digit."""
        lhs = [s[0] for s in self.statements]
        if len(set(lhs)) != len(lhs):
            raise ValueError("a variable is assigned twice")
        for l_, r in self.statements:
            if r not in DIGITS and r not in lhs:
                raise ValueError(f"{l_}={r}: {r} is never assigned")
        roots = [r for _, r in self.statements if r in DIGITS]
        if len(set(roots)) != len(roots):
            raise ValueError("two chains share a digit")
        if len(self.path) != self.hops:
            raise ValueError(f"query {self.query} is {len(self.path)} hops from its digit, not {self.hops}")

    def with_statement(self, i: int, rhs: str) -> "Problem":
        """A copy with statement ``i``'s right side replaced (hops recomputed)."""
        statements = list(self.statements)
        statements[i] = (statements[i][0], rhs)
        new = replace(self, statements=tuple(statements), hops=0)
        return replace(new, hops=len(new.path))


class TrainingBatch(NamedTuple):
    """Training sequences (see :meth:`VarBindTask.encode_training`)."""

    tokens: torch.Tensor  # [batch, pos]
    positions: torch.Tensor  # [segments]: the answer slots
    answers: torch.Tensor  # [batch, segments]
    step_answers: torch.Tensor | None  # [batch, segments, n_steps]: target after each step


@dataclass(frozen=True)
class VarBindTask:
    """Generator of variable-binding problems with a fixed number of statements.

    ``train_hops`` are the hop counts trained on; the test split holds other problems of the same
    hop counts and longer chains up to :attr:`max_hops` (``n_statements - 1``).
    """

    n_statements: int = 12
    max_extra: int = 2  # the queried chain continues for 0..max_extra links past the query
    max_chain: int = 8  # longest distractor chain
    test_fraction: float = 0.1
    variables: str = VARIABLES
    #: "chars": one token per character (``k?`` asks, the answer slot is ``?``); "statements": one
    #: token per statement ``x=y;`` (``?k`` asks, the answer slot is ``k``): a hop is one lookup
    encoding: str = "chars"
    tokenizer: CharTokenizer = field(default_factory=make_tokenizer, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 2 <= self.n_statements <= len(self.variables):
            raise ValueError(f"n_statements must lie in [2, {len(self.variables)}]")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError("test_fraction must lie in (0, 1)")
        if self.encoding not in ("chars", "statements"):
            raise ValueError(f"unknown encoding {self.encoding!r}: 'chars' or 'statements'")
        if self.encoding == "statements" and not self.tokenizer.words:
            object.__setattr__(self, "tokenizer", make_tokenizer("statements", self.variables))

    @property
    def segment_length(self) -> int:
        """Tokens per extra question of a training sequence (``;v?`` + answer, or ``?v``)."""
        return 2 if self.encoding == "statements" else 4

    @property
    def max_hops(self) -> int:
        return self.n_statements - 1  # at least one distractor statement

    @property
    def n_positions(self) -> int:
        """Prompt length in tokens, ``<bos>`` included."""
        return 3 + (1 if self.encoding == "statements" else 4) * self.n_statements

    def split_of(self, problem: Problem) -> Split:
        digest = hashlib.blake2b(problem.prompt.encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "big") / 2**64
        return "test" if u < self.test_fraction else "train"

    def _draw(self, rng: random.Random, hops: int) -> Problem:
        n = self.n_statements
        if not 1 <= hops <= self.max_hops:
            raise ValueError(f"hops must lie in [1, {self.max_hops}], got {hops}")
        names = rng.sample(self.variables, n)
        query_len = min(hops + rng.randint(0, self.max_extra), n - 1)
        for _ in range(1000):  # distractor chain lengths; every chain needs its own digit
            lengths = [query_len]
            left = n - query_len
            while left > 0:
                take = min(rng.randint(1, self.max_chain), left)
                lengths.append(take)
                left -= take
            if len(lengths) <= len(DIGITS):
                break
        else:  # pragma: no cover - needs n_statements far above 10 * max_chain
            raise ValueError("too many chains for distinct digits; lower n_statements or raise max_chain")
        digits = rng.sample(DIGITS, len(lengths))
        statements: list[tuple[str, str]] = []
        it = iter(names)
        query = ""
        for c, (length, digit) in enumerate(zip(lengths, digits)):
            prev = digit
            for depth in range(1, length + 1):
                var = next(it)
                statements.append((var, prev))
                prev = var
                if c == 0 and depth == hops:
                    query = var
        rng.shuffle(statements)
        return Problem(statements=tuple(statements), query=query, hops=hops, encoding=self.encoding)

    def sample(self, rng: random.Random, hops: int, split: Split = "train") -> Problem:
        """One problem with ``hops`` hops from ``split`` (rejection on the split hash)."""
        for _ in range(10_000):
            problem = self._draw(rng, hops)
            if self.split_of(problem) == split:
                return problem
        raise RuntimeError("could not draw a problem of the requested split")  # pragma: no cover

    def batch(
        self, rng: random.Random, n: int, hops: int | list[int] | tuple[int, ...], split: Split = "train"
    ) -> list[Problem]:
        """``n`` problems; ``hops`` an int or a list to draw uniformly from."""
        choices = [hops] if isinstance(hops, int) else list(hops)
        return [self.sample(rng, rng.choice(choices), split) for _ in range(n)]

    def dataset(self, hops: int, n: int, split: Split = "test", seed: int = 0) -> list[Problem]:
        """A fixed evaluation set: ``n`` distinct problems of ``hops`` hops."""
        rng = random.Random(1_000_003 * seed + 7919 * hops + (1 if split == "test" else 2))
        seen: set[str] = set()
        out: list[Problem] = []
        while len(out) < n:
            p = self.sample(rng, hops, split)
            if p.prompt not in seen:
                seen.add(p.prompt)
                out.append(p)
        return out

    def guessing_accuracy(self, hops: int, n: int, split: Split = "test", seed: int = 0) -> float:
        """Expected accuracy of a uniform guess among the digits that end a chain in the prompt,
        on :meth:`dataset` ``(hops, n, split, seed)``: the level a model reaches without
        following any link."""
        problems = self.dataset(hops, n, split=split, seed=seed)
        return sum(1 / len(p.chains()) for p in problems) / len(problems)

    # ---- tensors ----
    def encode(self, problems: list[Problem]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens [batch, n_positions], answers [batch])``: prompts with ``<bos>``, answer ids."""
        tok = self.tokenizer
        bos = tok.bos_token_id
        tokens = torch.tensor([[bos, *tok.encode(p.prompt)] for p in problems], dtype=torch.long)
        answers = torch.tensor([tok.encode(p.answer)[0] for p in problems], dtype=torch.long)
        return tokens, answers

    def encode_training(
        self,
        problems: list[Problem],
        rng: random.Random,
        n_queries: int,
        hops: list[int] | tuple[int, ...],
        n_recalls: int = 0,
        n_steps: int = 0,
    ) -> "TrainingBatch":
        """Training sequences that ask ``n_queries`` questions about the same statements::

            <bos>q=4;k=q;c=1;k?4;c=1;k=q;c?1;q?4        (n_queries=3, n_recalls=2)
            <bos>[q=4;][k=q;][c=1;]?k?c?q               (encoding "statements", n_queries=3)

        The first question is the problem itself (its prompt is a prefix, so the answer slot of
        the first question sees exactly the single-query prompt); then come ``n_recalls``
        *recalls* (``"chars"`` only), statements of the prompt repeated (``v=`` is supervised to
        predict the same right-hand side: one link followed), then the other questions, about
        variables at a hop count in ``hops``. Every segment is :attr:`segment_length` tokens.
        Returns a :class:`TrainingBatch`: ``tokens [batch, pos]`` (stopping before the last
        answer), ``positions [segments]`` (the answer slots), ``answers [batch, segments]`` and,
        with ``n_steps > 0``, the target of every question after each recurrent step: the right
        side reached after ``r`` links (the digit once the chain has ended),
        ``step_answers [batch, segments, n_steps]`` -- one hop per step.
        """
        if n_recalls and self.encoding == "statements":
            raise ValueError("recalls need the 'chars' encoding")
        if n_recalls and n_steps:
            raise ValueError("per-step targets are defined for questions, not recalls")
        tok = self.tokenizer
        rows, answers, per_step = [], [], []
        for p in problems:
            text, ans, asked = p.text, [p.answer], [p.query]
            if self.encoding == "statements":
                text = p.prompt
            for i in (rng.choices(range(len(p.statements)), k=n_recalls) if n_recalls else []):
                lhs, rhs = p.statements[i]
                text += f";{lhs}={rhs}"
                ans.append(rhs)
            for var, value in self._extra_queries(p, rng, n_queries - 1, hops):
                text += f"?{var}" if self.encoding == "statements" else f";{var}?{value}"
                ans.append(value)
                asked.append(var)
            ids = [tok.bos_token_id, *tok.encode(text)]
            rows.append(ids if self.encoding == "statements" else ids[:-1])
            answers.append(tok.encode("".join(ans)))
            if n_steps:
                chains = [p.links(v) for v in asked]
                per_step.append([tok.encode("".join(c[min(r, len(c)) - 1] for r in range(1, n_steps + 1)))
                                 for c in chains])
        first = self.n_positions - 1
        n_segments = n_queries + n_recalls
        positions = torch.tensor([first + self.segment_length * q for q in range(n_segments)], dtype=torch.long)
        return TrainingBatch(
            tokens=torch.tensor(rows, dtype=torch.long),
            positions=positions,
            answers=torch.tensor(answers, dtype=torch.long),
            step_answers=torch.tensor(per_step, dtype=torch.long) if n_steps else None,
        )

    @staticmethod
    def _extra_queries(problem: Problem, rng: random.Random, n: int, hops: list[int] | tuple[int, ...]
                       ) -> list[tuple[str, str]]:
        if n <= 0:
            return []
        depth: dict[str, tuple[int, str]] = {}
        for chain in problem.chains():
            digit = problem.statements[chain[0]][1]
            for d, i in enumerate(chain, 1):
                depth[problem.statements[i][0]] = (d, digit)
        allowed = set(hops)
        candidates = [v for v, (d, _) in depth.items() if d in allowed and v != problem.query] or [problem.query]
        picks = rng.sample(candidates, n) if len(candidates) >= n else [rng.choice(candidates) for _ in range(n)]
        return [(v, depth[v][1]) for v in picks]

    def digit_ids(self) -> torch.Tensor:
        return torch.tensor(self.tokenizer.encode(DIGITS), dtype=torch.long)


def _other_digit(problem: Problem, rng: random.Random) -> str:
    used = {rhs for _, rhs in problem.statements if rhs in DIGITS}
    return rng.choice([d for d in DIGITS if d not in used])


def corrupt_root(problem: Problem, rng: random.Random) -> Problem:
    """Change the queried chain's digit to one no chain uses: the answer changes to it; the prompt
    differs at ``problem.mechanism.value_pos`` only."""
    return problem.with_statement(problem.path[-1], _other_digit(problem, rng))


def corrupt_distractor(problem: Problem, rng: random.Random) -> Problem:
    """Change the digit of a chain the query does not reach (to one no chain uses): the answer
    must not change."""
    on_path = set(problem.path)
    roots = [c[0] for c in problem.chains() if c[0] not in on_path]
    if not roots:
        raise ValueError("problem has no distractor chain")
    return problem.with_statement(rng.choice(roots), _other_digit(problem, rng))


def corrupt_link(problem: Problem, hop: int, rng: random.Random) -> Problem:
    """Redirect the variable link followed at ``hop`` (``0 <= hop < hops - 1``) to a variable of
    another chain: the answer becomes that chain's digit; the prompt differs at
    ``problem.mechanism.rhs_pos[hop]`` only."""
    path = problem.path
    if not 0 <= hop < len(path) - 1:
        raise ValueError(f"hop must lie in [0, {len(path) - 2}] (the last hop is the digit: use corrupt_root)")
    chains = problem.chains()
    query_chain = next(c for c in chains if path[-1] == c[0])
    others = [i for c in chains if c is not query_chain for i in c]
    if not others:
        raise ValueError("problem has no other chain to redirect to")
    target = problem.statements[rng.choice(others)][0]
    return problem.with_statement(path[hop], target)
