"""Command-line values checked, and ``train`` options kept in a YAML file.

``retina-fast train --config FILE.yaml``: the schema is the ``train`` command's own argument
parser, so there is one list of options and it cannot drift. Every flag is a key, spelt as its
long name with ``_`` for ``-`` (``batch_size``, ``lr_steps``; ``-`` is accepted too), and takes
the flag's type: a number for ``lr``, a list for ``lr_steps`` / ``min_size``, ``true``/``false``
for switches such as ``amp``, one of the choices for ``optimizer``, ``null`` for "not set"
(``channels_last: null`` is the hardware's choice, like ``precision: auto``).
``model_opt`` is a mapping (``{norm: gn, head_convs: 4}``). Precedence: built-in defaults <
the file < flags on the command line (``--model-opt`` is merged key by key over the file's).

The resolved config (every key, after the merge) is what ``--print-config`` prints, what the
trainer writes to ``OUT/config.yaml`` and what the checkpoint keeps under ``"config"``: plain
``str``/``int``/``float``/``bool``/``None``/``list``/``dict`` only, so it loads with
``torch.load(weights_only=True)``. ``retina-fast train --config OUT/config.yaml`` repeats the run.

YAML library: PyYAML (``yaml.safe_load``/``safe_dump``). It is the maintained reference YAML
parser for Python, small, and already what OmegaConf itself parses with; we need no
interpolation or structured-config layer, because argparse already is the schema. Two
PyYAML habits are corrected here: a float written without a dot (``1e-4``) is a float (YAML 1.1
made it a string; OmegaConf patches this the same way), and a key written twice is an error
instead of silently keeping the last.

Every problem is a :class:`RetinaFastError` of one line naming the file and the key.
:func:`check_args` also checks the ranges of the numbers any command takes (``--batch-size 0``,
``--hflip 2``), the device name and that optional packages a flag needs are installed.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import warnings

from retina_fast.data.errors import RetinaFastError

# Dests that are not options of the run itself.
_NOT_CONFIG = {"help", "config", "print_config", "func", "command"}
_KV_LIST = "model_opt"  # KEY=VALUE on the command line, a mapping in the file

# Ranges of numeric options, by dest, for every command that has the dest. A value that is not
# a number (demo's --val-images is a count, train's a folder) is left alone.
_AT_LEAST = {
    "batch_size": 1, "epochs": 1, "workers": 0, "threads": 0, "warmup_iters": 0,
    "log_every": 1, "max_iters": 1, "shapes_stream": 0, "seed": 0, "val_images": 1,
    "train": 0, "val": 0, "size": 32, "min_size": 1, "max_size": 1, "lr_steps": 0,
}
_POSITIVE = {"lr", "time_budget", "lr_gamma", "dist_timeout"}
_NON_NEGATIVE = {"momentum", "weight_decay", "clip_grad"}
_PROBABILITY = {"hflip"}


# ------------------------------------------------------------------------------ the schema


class Option:
    """One flag of a parser, as a config key."""

    def __init__(self, action: argparse.Action):
        self.key = action.dest
        self.flag = max(action.option_strings, key=len)
        self.default = action.default
        self.choices = tuple(action.choices) if action.choices else None
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            self.kind = "bool"  # (a --x/--no-x pair with default None also takes null: "auto")
        elif action.dest == _KV_LIST:
            self.kind = "mapping"
        else:
            self.kind = {int: "int", float: "float"}.get(action.type, "str")
        self.many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
        self.nonempty = action.nargs == "+"

    def check(self, value, where: str):
        """``value`` (from YAML) converted to what argparse would have made of the flag."""
        if value is None:
            if self.kind == "bool" and self.default is not None:
                raise RetinaFastError(f"{where}: must be true or false, not null")
            return None
        if self.kind == "mapping":
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise RetinaFastError(f"{where}: must be a mapping of option names to values "
                                      f"(e.g. {{norm: gn, head_convs: 4}}), not {_show(value)}")
            return dict(value)
        if self.many:
            items = value if isinstance(value, list) else [value]
            if self.nonempty and not items:
                raise RetinaFastError(f"{where}: must be a non-empty list")
            return [self._scalar(v, where) for v in items]
        return self._scalar(value, where)

    def _scalar(self, v, where):
        if self.kind == "bool":
            ok = isinstance(v, bool)
            want = "true or false"
        elif self.kind == "int":
            ok = isinstance(v, int) and not isinstance(v, bool)
            want = "an integer"
        elif self.kind == "float":
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            want = "a number"
            v = float(v) if ok else v
        else:
            ok = isinstance(v, str)
            want = "a string"
        if not ok:
            raise RetinaFastError(f"{where}: must be {want}, not {_show(v)}")
        if self.choices and v not in self.choices:
            raise RetinaFastError(f"{where}: must be one of {', '.join(map(str, self.choices))}, "
                                  f"not {_show(v)}")
        return v


def _show(v) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(v), type(v).__name__)
    text = repr(v) if not isinstance(v, (list, dict)) else json.dumps(v)
    return f"{text[:60]} ({kind})"


def options(parser: argparse.ArgumentParser) -> dict:
    """``{key: Option}`` for every flag of ``parser`` that configures a run, in parser order."""
    out = {}
    for a in parser._actions:  # the first flag of a dest names it (--channels-last, not --no-...)
        if a.option_strings and a.dest not in _NOT_CONFIG and a.dest != argparse.SUPPRESS:
            out.setdefault(a.dest, Option(a))
    return out


def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a.choices[name]
    raise KeyError(name)


# ------------------------------------------------------------------------------------ YAML


def _yaml():
    try:
        import yaml
    except ImportError:
        raise RetinaFastError("--config needs PyYAML: pip install pyyaml") from None
    return yaml


_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)


def _loader_class():
    yaml = _yaml()

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    return Loader


def read_yaml(path: str) -> dict:
    """The mapping in ``path``; a missing file, bad YAML or a non-mapping is a one-line error."""
    yaml = _yaml()
    if not os.path.isfile(path):
        raise RetinaFastError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_loader_class())  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        what = "" if problem.endswith("appears twice") else "not valid YAML: "
        raise RetinaFastError(f"config {path}{at}: {what}{problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RetinaFastError(f"cannot read config {path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RetinaFastError(f"config {path}: the file must hold a mapping of option names to "
                              f"values, not {_show(data)}")
    return data


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """Read ``path`` and check every key against ``parser``'s flags: ``{dest: value}``."""
    opts = options(parser)
    out = {}
    for raw_key, value in read_yaml(path).items():
        key = str(raw_key).replace("-", "_")
        if key not in opts:
            near = difflib.get_close_matches(key, list(opts), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise RetinaFastError(f"config {path}: unknown key '{raw_key}'{hint}")
        where = f"config {path}: '{raw_key}'"
        v = opts[key].check(value, where)
        _check_range(key, v, where)
        out[key] = v
    return out


def apply_config(parser: argparse.ArgumentParser, argv: list, config: dict):
    """Parse ``argv`` with ``config`` as the defaults of ``parser``'s ``train`` command."""
    values = dict(config)
    model_opts = values.pop(_KV_LIST, None)
    subparser(parser, "train").set_defaults(**values)
    args = parser.parse_args(argv)
    if model_opts:
        # The file's options first, so a --model-opt of the same key wins.
        setattr(args, _KV_LIST, [f"{k}={json.dumps(v)}" for k, v in model_opts.items()]
                + list(getattr(args, _KV_LIST) or []))
    return args


def parse_kv(item: str):
    """``KEY=VALUE`` of ``--model-opt``: VALUE read as JSON when it is JSON, else a string."""
    k, eq, v = item.partition("=")
    if not eq or not k.strip():
        raise RetinaFastError(f"--model-opt {item!r}: expected KEY=VALUE, e.g. head_convs=4")
    try:
        return k.strip(), json.loads(v)
    except json.JSONDecodeError:
        return k.strip(), v


def model_kwargs(args) -> dict:
    """``build_model`` keyword arguments from ``--min-size``, ``--max-size``, ``--model-opt``."""
    kw = {}
    if args.min_size:
        kw["min_size"] = args.min_size if len(args.min_size) > 1 else args.min_size[0]
    if args.max_size:
        kw["max_size"] = args.max_size
    kw.update(parse_kv(item) for item in args.model_opt or [])
    return kw


def resolved_config(args, parser: argparse.ArgumentParser) -> dict:
    """Every option of the ``train`` command with its value for this run (plain types)."""
    out = {}
    for key in options(subparser(parser, "train")):
        v = getattr(args, key, None)
        if key == _KV_LIST:
            v = dict(parse_kv(item) for item in v or [])
        elif isinstance(v, tuple):
            v = list(v)
        out[key] = v
    return out


def dump_config(config: dict, source: str | None = None) -> str:
    """``config`` as YAML, keys in parser order. Training writes it even without PyYAML:
    one ``key: <JSON value>`` line per key is YAML too (only reading needs PyYAML)."""
    order = f"built-in defaults < {source} < command line" if source else "built-in defaults < command line"
    head = f"# retina-fast train: the resolved config ({order})\n"
    try:
        import yaml
    except ImportError:
        return head + "".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items())
    return head + yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=100)


def write_config(out_dir: str, config: dict, source: str | None = None) -> str:
    path = os.path.join(out_dir, "config.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(dump_config(config, source))
    return path


# ------------------------------------------------------------------------- argument checks


def _check_range(key: str, value, where: str):
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise RetinaFastError(f"{where}: must be a finite number, not {v}")
        if key in _AT_LEAST and v < _AT_LEAST[key]:
            raise RetinaFastError(f"{where}: must be at least {_AT_LEAST[key]}, not {v}")
        if key in _POSITIVE and not v > 0:
            raise RetinaFastError(f"{where}: must be positive, not {v}")
        if key in _NON_NEGATIVE and v < 0:
            raise RetinaFastError(f"{where}: must not be negative, not {v}")
        if key in _PROBABILITY and not 0 <= v <= 1:
            raise RetinaFastError(f"{where}: must be between 0 and 1, not {v}")


def check_args(args, parser: argparse.ArgumentParser) -> None:
    """Ranges of every numeric flag, the device name, the ``--model-opt`` form, and the
    packages that optional flags need. Raises a one-line :class:`RetinaFastError`."""
    sub = subparser(parser, args.command)
    flags = {a.dest: max(a.option_strings, key=len) for a in sub._actions if a.option_strings}
    for key, flag in flags.items():
        v = getattr(args, key, None)
        if v is not None:
            _check_range(key, v, f"argument {flag}")
    for item in getattr(args, _KV_LIST, None) or []:
        parse_kv(item)
    if getattr(args, "device", None):
        from retina_fast.engine.train import resolve_device

        resolve_device(args.device)
    if getattr(args, "tensorboard", False):
        from retina_fast.engine.logging_utils import require_tensorboard

        require_tensorboard()
    if getattr(args, "coco_backend", None):
        from retina_fast.engine.coco_backends import resolve_backend

        resolve_backend(args.coco_backend)


def check_model(name: str, kwargs: dict) -> None:
    """Build model ``name`` with ``kwargs`` on the meta device (no memory, milliseconds), so
    that an unknown model or an option it does not take is a one-line error before any data
    is read, not a traceback from inside the trainer."""
    import torch

    from retina_fast.engine.model_factory import build_model

    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            build_model(name, 1, **kwargs)
    except Exception as e:  # noqa: BLE001 -- whatever the builder raises on these options
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "unknown model" in msg:
            raise RetinaFastError(f"argument --model: {msg}") from None
        opts = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no options"
        raise RetinaFastError(f"model {name} cannot be built with {opts}: {msg}") from None
