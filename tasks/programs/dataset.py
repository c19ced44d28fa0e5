"""Datasets as JSONL, and users' own tasks (`module:attr` program + metric + JSONL file).

One JSON object per line: the input and output fields, plus an optional `"split"`
(`"train" | "val" | "test"`). Errors name the file and the line, because these files are
hand-edited and a bare `JSONDecodeError` from line 143 of 200 helps nobody.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import numbers
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import dspy

from tasks.programs import TaskDefinition

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
# Fixed seed: a dataset without a "split" column must split the same way in every run and every
# process, or val scores of different runs would not be comparable.
DEFAULT_SPLIT_SEED = 0
UNKNOWN = "unknown"


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message names the file and, if any, the line."""


class UserTaskError(ValueError):
    """A user's program or metric reference that cannot be resolved or used."""


class UserMetricError(UserTaskError):
    """The user's metric raised, or returned something that is not a score."""


@dataclass
class Splits:
    """Train/val/test examples, each `dspy.Example` with its inputs marked."""

    train: list[dspy.Example] = field(default_factory=list)
    val: list[dspy.Example] = field(default_factory=list)
    test: list[dspy.Example] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def load_jsonl(
    path: str | os.PathLike[str],
    input_fields: Sequence[str],
    output_fields: Sequence[str],
    *,
    seed: int = DEFAULT_SPLIT_SEED,
) -> Splits:
    """Read and validate a JSONL dataset into fixed splits.

    Rows with a `split` keep it; rows without one are split 60/20/20 by a seeded shuffle.
    Raises `DatasetError` for an unreadable or empty file, a bad line (invalid JSON or UTF-8,
    not an object, a missing or null field, an unknown split) or a split that ends up empty.
    """
    path = Path(path)
    wanted = (*input_fields, *output_fields)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read dataset: {exc.strerror or exc}") from exc

    buckets: dict[str, list[dspy.Example]] = {name: [] for name in SPLIT_NAMES}
    unsplit: list[dspy.Example] = []
    for lineno, line_bytes in enumerate(raw.splitlines(), start=1):
        where = f"{path}:{lineno}"
        try:
            # utf-8-sig: tolerate a BOM, which some editors write at the start of the file.
            line = line_bytes.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{where}: not valid UTF-8 ({exc.reason})") from exc
        if not line.strip():
            continue  # blank lines (e.g. a trailing one) are harmless
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
        if not isinstance(row, dict):
            raise DatasetError(
                f"{where}: expected a JSON object, got {type(row).__name__} ({_preview(line)})"
            )
        missing = [name for name in wanted if name not in row]
        if missing:
            raise DatasetError(
                f"{where}: missing field{'s' if len(missing) > 1 else ''} "
                f"{', '.join(repr(m) for m in missing)} (expected {list(wanted)})"
            )
        nulls = [name for name in wanted if row[name] is None]
        if nulls:
            raise DatasetError(f"{where}: field {nulls[0]!r} is null")
        example = dspy.Example(**{name: row[name] for name in wanted}).with_inputs(*input_fields)
        if "split" not in row:
            unsplit.append(example)
            continue
        split = row["split"]
        if split not in SPLIT_NAMES:
            raise DatasetError(
                f"{where}: unknown split value {split!r} (expected one of {list(SPLIT_NAMES)})"
            )
        buckets[split].append(example)

    if not unsplit and not any(buckets.values()):
        raise DatasetError(f"{path}: empty file, no examples")
    for name, examples in _assign_splits(unsplit, seed).items():
        buckets[name].extend(examples)
    empty = [name for name in SPLIT_NAMES if not buckets[name]]
    if empty:
        counts = ", ".join(f"{name}={len(buckets[name])}" for name in SPLIT_NAMES)
        raise DatasetError(
            f"{path}: split {empty[0]!r} is empty ({counts}); every split needs at least one "
            'example: add rows or set their "split"'
        )
    return Splits(**buckets)


def _assign_splits(examples: list[dspy.Example], seed: int) -> dict[str, list[dspy.Example]]:
    """60/20/20 after a seeded shuffle, with at least one example per split when n >= 3."""
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    n = len(shuffled)
    if n == 0:
        return {name: [] for name in SPLIT_NAMES}
    n_train = max(1, int(n * 0.6))
    n_val = min(max(1, int(n * 0.2)), n - n_train)
    return {
        "train": shuffled[:n_train],
        "val": shuffled[n_train : n_train + n_val],
        "test": shuffled[n_train + n_val :],
    }


def _preview(text: str, limit: int = 40) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- users' own tasks ---------------------------------------------------------------------------


def load_user_task(
    program_ref: str, metric_ref: str, dataset_path: str | os.PathLike[str]
) -> TaskDefinition:
    """Build a `TaskDefinition` from a user's program, metric and JSONL dataset.

    `program_ref` is `module:attr` naming a `dspy.Module` subclass or a zero-argument factory
    returning a `dspy.Module`; `metric_ref` is `module:fn`, a DSPy metric. `module` may be a
    dotted module name or a path to a `.py` file. Input/output fields are those of the
    program's first predictor. Everything is checked now (the program is built once and the
    dataset loaded) so that a bad reference fails before any LM call.
    """
    target = resolve_ref(program_ref, what="program")
    build_program = _program_factory(target, program_ref)
    program = _build_checked(build_program, program_ref)
    predictors = program.predictors()
    if not predictors:
        raise UserTaskError(
            f"program {program_ref!r} has no dspy.Predict (or other predictor) to optimize"
        )
    signature = predictors[0].signature
    input_fields = tuple(signature.input_fields)
    output_fields = tuple(signature.output_fields)

    metric = resolve_ref(metric_ref, what="metric")
    if not callable(metric):
        raise UserTaskError(
            f"metric {metric_ref!r} is not callable (it is a {type(metric).__name__})"
        )
    _check_metric_arity(metric, metric_ref)
    metric = UserMetric(metric, metric_ref)

    dataset_path = Path(dataset_path)
    load_jsonl(dataset_path, input_fields, output_fields)  # fail fast, with line numbers

    return TaskDefinition(
        name=program_ref,
        description=f"user task: program {program_ref}, metric {metric_ref}, data {dataset_path}",
        build_program=build_program,
        metric=metric,
        input_fields=input_fields,
        output_fields=output_fields,
        dataset_path=dataset_path,
        wrong_answer=_user_wrong_answer,
    )


def resolve_ref(ref: str, *, what: str = "object") -> Any:
    """Import `module:attr` (attr may be dotted: `module:Class.factory`); `UserTaskError` if not."""
    module_name, sep, attr_path = ref.partition(":")
    if not sep or not module_name.strip() or not attr_path.strip():
        raise UserTaskError(f"{what} reference {ref!r} must look like 'module:attribute'")
    module = _import_module(module_name.strip(), ref, what)
    obj: Any = module
    for part in attr_path.strip().split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UserTaskError(
                f"{what} reference {ref!r}: module {module.__name__!r} has no attribute "
                f"{attr_path.strip()!r}"
            ) from None
    return obj


def _import_module(module_name: str, ref: str, what: str) -> ModuleType:
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        return _import_file(Path(module_name), ref, what)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = module_name.split(".")[0]
        cwd = os.getcwd()
        # A console script (`dspyflow ...`) does not put the working directory on sys.path, yet
        # users expect `my_program:Prog` next to them to import. Retry with it appended (last, so
        # it cannot shadow installed packages), but only if the missing module is theirs.
        if exc.name == top and cwd not in sys.path and "" not in sys.path:
            sys.path.append(cwd)
            try:
                return importlib.import_module(module_name)
            except ModuleNotFoundError:
                pass
            except Exception as inner:
                raise _import_error(ref, what, module_name, inner) from inner
        raise _import_error(ref, what, module_name, exc) from exc
    except Exception as exc:  # the user's module itself failed: SyntaxError, its own imports...
        raise _import_error(ref, what, module_name, exc) from exc


def _import_file(path: Path, ref: str, what: str) -> ModuleType:
    if not path.is_file():
        raise UserTaskError(f"{what} reference {ref!r}: file {str(path)!r} does not exist")
    name = f"dspyflow_user_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserTaskError(f"{what} reference {ref!r}: cannot import file {str(path)!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise _import_error(ref, what, str(path), exc) from exc
    return module


def _import_error(ref: str, what: str, module_name: str, exc: BaseException) -> UserTaskError:
    return UserTaskError(
        f"{what} reference {ref!r}: cannot import module {module_name!r}: "
        f"{type(exc).__name__}: {exc}"
    )


def _program_factory(target: Any, ref: str) -> Callable[[], dspy.Module]:
    if isinstance(target, type):
        if not issubclass(target, dspy.Module):
            raise UserTaskError(
                f"program {ref!r} is a class but not a dspy.Module subclass ({target.__name__})"
            )
        return target
    if isinstance(target, dspy.Module):
        # An instance works too: each run gets its own deep copy, never the shared original.
        # (a partial, not a lambda, so the task stays picklable for process-based runners)
        return functools.partial(_copy_program, target)
    if callable(target):
        return target
    raise UserTaskError(
        f"program {ref!r} must be a dspy.Module subclass or a zero-argument factory, "
        f"not a {type(target).__name__}"
    )


def _copy_program(program: dspy.Module) -> dspy.Module:
    return program.deepcopy()


def _build_checked(build_program: Callable[[], dspy.Module], ref: str) -> dspy.Module:
    try:
        program = build_program()
    except Exception as exc:
        raise UserTaskError(
            f"program {ref!r} could not be built with no arguments: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(program, dspy.Module):
        raise UserTaskError(
            f"program {ref!r} returned a {type(program).__name__}, not a dspy.Module"
        )
    return program


def _check_metric_arity(metric: Callable[..., Any], ref: str) -> None:
    try:
        signature = inspect.signature(metric)
    except (TypeError, ValueError):
        return  # some builtins/C callables have no signature; let the first call tell
    try:
        signature.bind(None, None, None)
    except TypeError:
        raise UserTaskError(
            f"metric {ref!r} must accept (gold, pred, trace=None); its signature is {signature}"
        ) from None


class UserMetric:
    """A user's metric whose failures name it.

    Inside DSPy's evaluator a raising metric is just one more error, and a run whose every
    example failed ended "Execution cancelled due to errors". Raised as UserMetricError,
    the cycle's failure says which metric failed and how. A class, not a closure, so the
    task stays picklable; ``__wrapped__`` keeps the user's signature for callers that
    inspect it (GEPA's five-argument adapter)."""

    def __init__(self, fn: Callable[..., Any], ref: str) -> None:
        self.__wrapped__ = fn
        self.ref = ref
        self.__name__ = getattr(fn, "__name__", "metric")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            score = self.__wrapped__(*args, **kwargs)
        except Exception as exc:
            raise UserMetricError(
                f"metric {self.ref!r} raised {type(exc).__name__}: {exc}"
            ) from exc
        if not _is_score(score):
            raise UserMetricError(
                f"metric {self.ref!r} returned {type(score).__name__} {_preview(repr(score))}; "
                "a metric returns a number or a bool"
            )
        return score


def _is_score(value: Any) -> bool:
    # Numbers (bool, numpy scalars), or a dspy.Prediction-like object with a score (GEPA).
    return isinstance(value, numbers.Real) or hasattr(value, "score")


def _user_wrong_answer(gold_outputs: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """For a user task we know no plausible confusions: string outputs become "unknown"."""
    del rng  # deterministic; the parameter keeps the `wrong_answer` shape
    return {k: UNKNOWN if isinstance(v, str) else v for k, v in gold_outputs.items()}


__all__ = [
    "DEFAULT_SPLIT_SEED",
    "SPLIT_NAMES",
    "DatasetError",
    "Splits",
    "UserMetric",
    "UserMetricError",
    "UserTaskError",
    "load_jsonl",
    "load_user_task",
    "resolve_ref",
]
