"""Rule-based rewards: score responses with a Python function instead of (or on top of) a reward model.

A reward function takes the decoded prompt and response and the prompt's data record, and returns a
number::

    def my_reward(prompt: str, response: str, sample: Mapping) -> float: ...

``sample`` is the prompt's JSONL line as a dict (``{"prompt": ..., "answer": ..., ...}``), so a task can
carry what its checker needs (reference answers, unit tests, ...). ``load_reward_fn`` finds one by name
(``"package.module:function"`` or ``"path/to/file.py:function"``), and ``FunctionReward`` applies it to a
rollout's token rows. ``math_answer`` is a built-in checker for tasks with a final answer (GSM8K-style
``#### 42``, LaTeX ``\\boxed{42}``, or the last number of the response).

``RemoteReward`` sends the same rows to a reward service over HTTP instead, one request per scoring batch.

In PPO (``PPOLoop(reward_fn=...)``) a function runs once per response (a service once per batch) on one
rank of each model-parallel group, and its scores are broadcast to the group: a function that is not deterministic (a sandbox with a
timeout, a sampled judge) still gives every TP/PP rank of a replica the same scores.
"""
from __future__ import annotations

import http.client
import importlib
import importlib.util
import json
import math
import re
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

RewardFn = Callable[[str, str, Mapping], float]


def load_reward_fn(spec: str) -> RewardFn:
    """``"package.module:function"`` (importable from ``sys.path``) or ``"path/to/file.py:function"`` -> the
    function. ValueError naming the spec and what is wrong (format, file, import error, attribute)."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"reward function {spec!r}: expected 'package.module:function' or "
                         "'path/to/file.py:function'")
    where, name = spec.split(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"reward function {spec!r}: no file {path}")
        # a module name unique to the file: two reward files named alike do not replace each other
        module_name = f"_reward_fn_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(module_name)
        if module is None:
            # helpers beside the file import as in a script run from its folder (appended: never shadowing)
            if str(path.resolve().parent) not in sys.path:
                sys.path.append(str(path.resolve().parent))
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            try:
                loader_spec.loader.exec_module(module)
            except Exception as e:
                raise ValueError(f"reward function {spec!r}: running {path} failed: {type(e).__name__}: {e}") from e
            sys.modules[module_name] = module
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise ValueError(f"reward function {spec!r}: importing {where} failed: {type(e).__name__}: {e} (is it "
                             "on PYTHONPATH? a file path must end in .py)") from e
    fn = getattr(module, name, None)
    if fn is None:
        raise ValueError(f"reward function {spec!r}: {where} has no attribute {name!r}")
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {where}.{name} is a {type(fn).__name__}, not a function")
    return fn


# ---- built-in checker ----------------------------------------------------------------------------

# A number: an optional sign that does not follow a digit ("10-12" is two numbers), digits with thousands
# separators only in groups of three ("3,4" is two numbers), an optional decimal part.
_NUMBER = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\d.])-?\.\d+")


def final_answer(text: str) -> Optional[str]:
    """The answer a response commits to: the last ``\\boxed{...}`` (braces may nest), else what follows the
    last ``####`` on its line (its leading number when it starts with one: ``#### 72 clips`` is 72), else the
    last number; None when there is none."""
    start = text.rfind("\\boxed{")
    if start >= 0:
        depth, i = 1, start + len("\\boxed{")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i:j].strip()
        # an unclosed box is no committed answer: fall through to the other forms
    if "####" in text:
        answer = text.rsplit("####", 1)[1].strip().splitlines()
        if answer and answer[0].strip():
            number = _NUMBER.match(answer[0].strip())
            return number.group() if number else answer[0].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_answer(answer: str) -> str:
    """Comparable form: surrounding space, ``$`` and a final period dropped, case folded; a number written
    canonically and exactly (``"1,000.0"`` -> ``"1000"``, ``"0.50"`` -> ``"0.5"``; no float rounding)."""
    s = answer.strip().strip("$").strip().rstrip(".").strip().lower()
    if not _NUMBER.fullmatch(s):
        return s
    value = Decimal(s.replace(",", ""))
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def math_answer(prompt: str, response: str, sample: Mapping) -> float:
    """1.0 when the response's ``final_answer`` equals ``sample["answer"]`` (both normalised), else 0.0."""
    if "answer" not in sample:
        raise KeyError(f"math_answer needs an 'answer' field in each prompt record; this one has {sorted(sample)}")
    got = final_answer(response)
    return float(got is not None and normalize_answer(got) == normalize_answer(str(sample["answer"])))


math_answer.required_fields = ("answer",)  # checked on every record when the run starts (FunctionReward)


# ---- applying a function to token rows -----------------------------------------------------------------

class FunctionReward:
    """Scores token rows with a reward function.

    ``fn(prompt text, response text, sample) -> number``; ``decode(token ids) -> text`` (the tokenizer's,
    dropping special tokens such as the stop token); ``prompts`` / ``samples``: the prompt texts and their
    records, indexed like the prompt list given to the PPO loop. ``name``: how errors name the function.
    ``vocab_size``: the tokenizer's; sampled ids at or above it (a model vocabulary padded beyond the
    tokenizer's, as ChatGLM's) have no text and are left out of the decoded response. ``workers`` > 1 calls
    the function on that many rows at once (threads: for checkers that wait on a sandbox, a service or a
    judge; ``fn`` and ``decode`` must then be thread-safe). A function that reads fields of the records may list
    them as ``fn.required_fields`` (``math_answer`` does): every record is checked for them here, before any
    model is built or sampled."""

    def __init__(self, fn: RewardFn, decode: Callable[[Sequence[int]], str], prompts: Sequence[str],
                 samples: Optional[Sequence[Mapping]] = None, name: Optional[str] = None,
                 vocab_size: Optional[int] = None, workers: int = 1):
        if not (isinstance(workers, int) and workers >= 1):
            raise ValueError(f"workers={workers!r} must be a positive integer (threads calling the reward function)")
        samples = _records(prompts, samples)
        self.fn, self.decode, self.prompts, self.samples = fn, decode, list(prompts), samples
        self.name = name or getattr(fn, "__qualname__", repr(fn))
        required = getattr(fn, "required_fields", ())
        required = (required,) if isinstance(required, str) else tuple(required)  # "answer" is one field
        lacking = [i for i, sample in enumerate(samples) if any(f not in sample for f in required)]
        if lacking:
            raise ValueError(f"reward function {self.name} reads the fields {list(required)} of each prompt record, "
                             f"but {len(lacking)} of {len(samples)} records lack one (the first: record {lacking[0]}, "
                             f"fields {sorted(samples[lacking[0]])}); give --prompts a JSONL whose lines carry them "
                             "(the built-in questions have only 'prompt')")
        self.vocab_size, self.workers = vocab_size, workers

    def __call__(self, prompt_index: torch.Tensor, responses: torch.Tensor, response_mask: torch.Tensor
                 ) -> torch.Tensor:
        """prompt_index ``[n]`` (into ``prompts``), responses / response_mask ``[n, T]`` -> scores ``[n]`` fp32
        (CPU). A function error is re-raised naming the function and the row; a result that is not a finite
        number raises ValueError."""
        _check_rows(prompt_index, responses, response_mask)
        rows = list(enumerate(zip(prompt_index.tolist(), responses.tolist(), response_mask.bool().tolist())))
        if self.workers > 1:  # map keeps the row order and re-raises the first failing row's error
            with ThreadPoolExecutor(self.workers, thread_name_prefix="reward_fn") as pool:
                scores = list(pool.map(self._score_row, rows))
        else:
            scores = [self._score_row(row) for row in rows]
        return torch.tensor(scores, dtype=torch.float32)

    def _score_row(self, row_data) -> float:
        row, (p, tokens, mask) = row_data
        text = None
        try:
            text = _response_text(self.decode, self.vocab_size, tokens, mask)
            value = self.fn(self.prompts[p], text, self.samples[p])
        except Exception as e:
            what = "decoding the response" if text is None else f"response {text[:60]!r}"
            raise RuntimeError(f"reward function {self.name} failed on row {row} (prompt {p}: "
                               f"{self.prompts[p][:60]!r}, {what}): {type(e).__name__}: {e}") from e
        return _as_score(value, f"reward function {self.name}", row, p)


def _records(prompts: Sequence[str], samples: Optional[Sequence[Mapping]]) -> list:
    """One record per prompt: ``samples``, or ``{"prompt": text}`` each when None."""
    samples = [{"prompt": p} for p in prompts] if samples is None else list(samples)
    if len(samples) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(samples)} sample records: one record per prompt")
    return samples


def _response_text(decode: Callable[[Sequence[int]], str], vocab_size: Optional[int], tokens: Sequence[int],
                   mask: Sequence[bool]) -> str:
    """The text of a response row: its masked tokens decoded, ids at or above ``vocab_size`` left out."""
    return decode([t for t, m in zip(tokens, mask) if m and (vocab_size is None or t < vocab_size)])


def _as_score(value, who: str, row: int, prompt: int) -> float:
    """``value`` as a finite float; ValueError naming ``who`` and the row otherwise."""
    if isinstance(value, (str, bytes)):  # float("1.5") would pass: a text is not a score
        raise ValueError(f"{who} returned {value!r} ({type(value).__name__}) for row {row} (prompt {prompt}): it "
                         "must return a number")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{who} returned {value!r} ({type(value).__name__}) for row {row} (prompt {prompt}): it "
                         "must return a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{who} returned {value} for row {row} (prompt {prompt}): scores must be finite")
    return value


class RemoteReward:
    """Scores token rows with a reward service over HTTP: one POST per call, of JSON

        {"prompts": [str], "responses": [str], "records": [object]}      (one entry per row)

    answered with ``{"rewards": [number]}`` in the same order (a reward model served elsewhere, a sandbox,
    a judge). ``decode``, ``prompts``, ``samples`` and ``vocab_size`` as in ``FunctionReward``; every record
    must be JSON (checked here). A request that fails (no connection, timeout, a broken reply, HTTP 5xx or
    429) is retried ``retries`` times, ``backoff`` seconds apart (doubling); any other failure, or an answer
    of the wrong shape or with a non-finite reward, raises an error naming the URL."""

    def __init__(self, url: str, decode: Callable[[Sequence[int]], str], prompts: Sequence[str],
                 samples: Optional[Sequence[Mapping]] = None, vocab_size: Optional[int] = None,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 1.0):
        if not (isinstance(url, str) and url.startswith(("http://", "https://"))):
            raise ValueError(f"reward url {url!r} must start with http:// or https://")
        if not (timeout > 0 and isinstance(retries, int) and retries >= 0 and backoff >= 0):
            raise ValueError(f"reward url: timeout={timeout} must be > 0, retries={retries} and backoff={backoff} >= 0")
        samples = _records(prompts, samples)
        for i, sample in enumerate(samples):  # checked now, not at the first rollout
            try:
                json.dumps(sample, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise ValueError(f"reward url {url}: prompt record {i} cannot be sent as JSON ({e}): {sample!r:.200}") \
                    from None
        self.url, self.decode, self.prompts, self.samples = url, decode, list(prompts), samples
        self.vocab_size, self.timeout, self.retries, self.backoff = vocab_size, timeout, retries, backoff

    def __call__(self, prompt_index: torch.Tensor, responses: torch.Tensor, response_mask: torch.Tensor
                 ) -> torch.Tensor:
        """As ``FunctionReward.__call__``: prompt_index ``[n]``, responses / response_mask ``[n, T]`` -> ``[n]``."""
        _check_rows(prompt_index, responses, response_mask)
        index = prompt_index.tolist()
        texts = [_response_text(self.decode, self.vocab_size, tokens, mask)
                 for tokens, mask in zip(responses.tolist(), response_mask.bool().tolist())]
        body = json.dumps({"prompts": [self.prompts[p] for p in index], "responses": texts,
                           "records": [self.samples[p] for p in index]}, allow_nan=False).encode()
        answer = self._post(body)
        rewards = answer.get("rewards") if isinstance(answer, dict) else None
        if not isinstance(rewards, list) or len(rewards) != len(index):
            raise ValueError(f"reward service {self.url} answered {str(answer)[:200]!r}: expected {{\"rewards\": [...]}} "
                             f"with {len(index)} numbers")
        return torch.tensor([_as_score(v, f"reward service {self.url}", row, p)
                             for row, (v, p) in enumerate(zip(rewards, index))], dtype=torch.float32)

    def _post(self, body: bytes):
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    text = reply.read()
                break
            except urllib.error.HTTPError as e:
                try:
                    detail = e.read(200).decode(errors="replace")
                except Exception:  # the error body is a courtesy: a broken one must not hide the status
                    detail = "(no readable body)"
                # 5xx and 429 (rate limited) are the service's passing state: retried; others are this request's
                if (e.code < 500 and e.code != 429) or attempt == self.retries:
                    raise RuntimeError(f"reward service {self.url} answered HTTP {e.code}: {detail}") from None
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
                if attempt == self.retries:
                    raise RuntimeError(f"reward service {self.url} unreachable after {self.retries + 1} attempts: "
                                       f"{getattr(e, 'reason', e)}") from None
            time.sleep(self.backoff * 2 ** attempt)
        try:
            return json.loads(text)
        except ValueError:
            raise ValueError(f"reward service {self.url} answered non-JSON: {text[:200]!r}") from None


def _check_rows(prompt_index: torch.Tensor, responses: torch.Tensor, response_mask: torch.Tensor) -> None:
    if not (responses.dim() == 2 and response_mask.shape == responses.shape
            and prompt_index.shape == responses.shape[:1]):
        raise ValueError(f"reward: prompt_index {tuple(prompt_index.shape)}, responses {tuple(responses.shape)} and "
                         f"response_mask {tuple(response_mask.shape)} must be [n], [n, T] and [n, T]")


__all__ = ["FunctionReward", "RemoteReward", "RewardFn", "final_answer", "load_reward_fn", "math_answer", "normalize_answer"]
