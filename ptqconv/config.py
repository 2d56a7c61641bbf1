"""Calibration config file -> one checked, immutable `QuantConfig` of what the file says.

`load_config(path)` reads the three forms of MindSpore Lite's converter_lite calibration
config (docs/reference.md §1) and raises `PtqUsageError` (exit status 2) for every problem,
with a one-line message that names the file, the line, the section, the key, the value and
what is allowed (values are parsed by `ptqconv.values`; defaults are applied by
`ptqconv.settings`, not here):

    calib.cfg:7: [full_quant_param] activation_quant_method: 'KLD' is not supported; allowed: ...
    calib.cfg:9: unknown section [foo]; allowed: [common_quant_param], ...
    calib.cfg:8: [full_quant_param] bias_correction given twice (first on line 5)
    calib.cfg:4: batch_count: 0 is out of range; allowed: [1, 65535]     (flat form: no section)

Format detection, in this order:
  1. a `.yaml` / `.yml` extension -> YAML;
  2. otherwise the first line that is not blank and not a comment (`#` or `;`) decides:
     a `[section]` header -> sectioned INI; `---` or `key:` / `key: value` with no `=` -> YAML;
     anything else -> the flat `key=value` form.

The forms:
  flat (r0.7-r1.3)  `key=value` lines: image_path, batch_count, method_x, thread_num,
                    bias_correction, input_shape.
  INI (r1.5+)       [common_quant_param] quant_type, bit_num, min_quant_weight_size,
                    min_quant_weight_channel, skip_quant_node, debug_info_save_path,
                    target_device, enable_encode
                    [data_preprocess_param] calibrate_path, calibrate_size, input_type,
                    input_shape, and for input_type=IMAGE image_to_format, normalize_mean,
                    normalize_std, resize_width, resize_height, resize_method,
                    center_crop_width, center_crop_height
                    [full_quant_param] activation_quant_method, bias_correction, per_channel,
                    reduce_range, smooth_quant, equalize, latency_aware, measure_latency,
                    embedding_quant, histogram_sampling, activation_bit_num,
                    quant_strategy, dynamic_candidate,
                    thread_num, target_device (MindSpore's docs put it here too),
                    enable_all_ops
                    encodings_path (ptqconv's: AIMET / QNN encodings imported as
                    fixed grids)
                    [weight_quant_param] per_channel, bias_correction, quant_strategy,
                    dequant_strategy (Ascend only: refused), block_size,
                    measure_latency, keep_kernel_sums and shallow_convs_8bit (ptqconv's)
                    [mixed_bit_weight_quant_param] init_scale, auto_tune, max_iterations
                    [dynamic_quant_param] quant_strategy, measure_latency (ptqconv's)
                    [evaluate_param] eval_path, eval_size, accuracy_threshold,
                    cosine_threshold (ptqconv's accuracy gate after conversion)
  YAML              the same sections as top-level mappings with the same keys; lists
                    and mappings are accepted where they help (skip_quant_node: [a, b];
                    calibrate_path: {input: dir}; input_shape: {input: [1, 3, 8, 8]}), and a
                    section left empty (`full_quant_param:`) is an empty section.

Flat and INI are read with configparser: `=` is the only delimiter, keys are case-sensitive, no
interpolation, whole-line comments start with `#` or `;`, and an inline comment starts with a
`#` that follows whitespace (`a=1 # note`). YAML is read with safe_load semantics (no Python
tags); line numbers come from the composed nodes.

Where ptqconv differs from converter_lite, on purpose:
  - Unknown keys and sections, duplicated keys and sections and empty values (`key=`) are errors
    (converter_lite only warns about unknown flat keys: a misspelt key silently ignored gives a
    bad model). An empty `skip_quant_node` means no node.
  - Relative paths (calibrate_path, image_path, eval_path, debug_info_save_path,
    encodings_path) resolve against the config file's directory, not the current directory,
    so a config works from any directory. They are normalized lexically (os.path.abspath)
    and not checked here.
  - Flat `bias_correction` accepts `true` / `false` in any case and rejects anything else
    (converter_lite takes exactly `true` as true and everything else as false). The INI and YAML
    forms also accept 1/0, yes/no and on/off.
  - Integers are base-10 only. YAML scalars are read from their text, so `010` is 10 and `0x10`
    or `8.0` are errors, exactly as in the INI form.
  - Lines are not continued by indentation (each line stands alone, as in converter_lite).
  - `quant_type` also accepts ptqconv's spellings WeightQuant / PostTraining / DynamicQuant.
  - Sections of other converter_lite backends ([ascend_context], ...) are errors that say
    what they configure.
  - `calibrate_path` items `name:dir` split at the LAST `:` (as converter_lite does), so input
    names may contain `:` (`x:0`) but directories may not, nor `,`. In YAML, a mapping
    `{input_name: dir}` or a list avoids both limits.
"""

from __future__ import annotations

import configparser
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

import yaml

from ptqconv import target, values
from ptqconv.calibrate.observers import OBSERVERS
from ptqconv.errors import PtqUsageError

FORMATS = ("flat", "ini", "yaml")
U16_MAX = 65535  # docs/reference.md §1: min_quant_weight_size/channel, calibrate_size ranges
# docs/reference.md §1 / §2, plus MSE, and AUTO: measured on the user's data.
METHODS = (*OBSERVERS, "AUTO")
# docs/reference.md §6: how weights are rounded.
QUANT_STRATEGIES = ("MAX_MIN", "GPTQ")
MAX_ITERATIONS_MIN = 40  # docs/reference.md §6: max_iterations in [40, 65535]


@dataclass(frozen=True)
class QuantConfig:
    """What a calibration config file says: checked values, None where a key is absent.

    Defaults are not applied here: `ptqconv.settings` resolves flag > config > default.
    """

    source: Path
    format: str  # "flat" | "ini" | "yaml"
    quant_type: values.QuantType | None = None
    bit_num: int | None = None  # [0, 16]; settings narrow it per mode
    min_quant_weight_size: int | None = None  # [0, 65535]
    min_quant_weight_channel: int | None = None  # [0, 65535]
    skip_quant_node: tuple[str, ...] | None = None
    debug_info_save_path: Path | None = None
    target_device: str | None = None  # one of target.TARGETS
    # (input name, directory); the name is None for the flat form's positional image_path.
    calibrate_path: tuple[tuple[str | None, Path], ...] | None = None
    calibrate_size: int | None = None  # [1, 65535]
    input_shape: tuple[tuple[str, tuple[int, ...]], ...] | None = None
    activation_quant_method: str | None = None  # one of METHODS
    bias_correction: bool | None = None
    per_channel: bool | None = None
    reduce_range: bool | None = None
    smooth_quant: bool | None = None
    equalize: bool | None = None
    latency_aware: bool | None = None
    measure_latency: bool | None = None
    embedding_quant: bool | None = None
    histogram_sampling: bool | None = None
    shallow_convs_8bit: bool | None = None
    dynamic_candidate: bool | None = None  # AUTO may write DynamicQuant's model
    activation_bit_num: int | None = None  # [1, 8]
    encodings_path: Path | None = None  # an AIMET / QNN encodings file to import
    thread_num: int | None = None  # [1, 64]
    quant_strategy: str | None = None  # [full_quant_param], one of QUANT_STRATEGIES
    enable_encode: bool | None = None
    # [data_preprocess_param] input_type and MindSpore's image preprocessing keys.
    input_type: str | None = None  # BIN | IMAGE
    image_to_format: str | None = None  # RGB | GRAY | BGR
    normalize_mean: tuple[float, ...] | None = None
    normalize_std: tuple[float, ...] | None = None
    resize_width: int | None = None
    resize_height: int | None = None
    resize_method: str | None = None  # LINEAR | NEAREST | CUBIC
    center_crop_width: int | None = None
    center_crop_height: int | None = None
    # [weight_quant_param] (keys per_channel, bias_correction, quant_strategy)
    weight_per_channel: bool | None = None
    weight_bias_correction: bool | None = None
    weight_quant_strategy: str | None = None  # MAX_MIN | GPTQ
    block_size: int | None = None  # 0 or a power of two >= 16
    weight_measure_latency: bool | None = None
    keep_kernel_sums: bool | None = None
    weight_shallow_convs_8bit: bool | None = None
    # [mixed_bit_weight_quant_param]
    init_scale: float | None = None  # (0, 1)
    auto_tune: bool | None = None
    max_iterations: int | None = None  # [40, 65535]
    # [dynamic_quant_param] quant_strategy
    dynamic_quant_strategy: str | None = None  # ALWC | ACWL
    dynamic_measure_latency: bool | None = None
    # [evaluate_param]: the accuracy gate run after the model is written.
    eval_path: tuple[tuple[str, Path], ...] | None = None
    eval_size: int | None = None
    accuracy_threshold: float | None = None
    cosine_threshold: float | None = None
    # Line of every key given, by field name and by the key as written (flat `image_path` too).
    lines: Mapping[str, int] = field(default_factory=dict, hash=False)
    # The key as written for every field given: "[data_preprocess_param] calibrate_path",
    # "image_path" (flat form, no section).
    keys: Mapping[str, str] = field(default_factory=dict, hash=False)

    def line_of(self, key: str) -> str:
        """`calib.cfg:5` where `key` (a field name or a key as written) was set, or `calib.cfg`."""
        line = self.lines.get(key)
        return f"{self.source}:{line}" if line is not None else str(self.source)

    def where(self, name: str) -> str:
        """Prefix for a caller's message about a field: `calib.cfg:5: [sec] key` (as written)."""
        return f"{self.line_of(name)}: {self.keys.get(name, name)}"


def load_config(path: str | os.PathLike[str]) -> QuantConfig:
    """Read, detect the form of and validate a calibration config (see the module docstring)."""
    source = Path(path)
    text = _read_text(source)
    fmt = detect_format(source, text)
    base = Path(os.path.abspath(source)).parent
    if fmt == "yaml":
        sections = _yaml_sections(source, text)
        schema = _SECTIONED
    else:
        sections = _ini_sections(source, text, flat=fmt == "flat")
        schema = {None: _FLAT_KEYS} if fmt == "flat" else _SECTIONED
    return _build(source, fmt, base, sections, schema)


def detect_format(path: Path, text: str) -> str:
    """Return the form: "yaml" for .yaml/.yml, else "ini", "yaml" or "flat" by the content."""
    if path.suffix.lower() in (".yaml", ".yml"):
        return "yaml"
    return _detect_by_content(text)


def _detect_by_content(text: str) -> str:
    for line in text.split("\n"):
        line = line.strip()
        if not line or line.startswith(_COMMENTS):
            continue
        if configparser.ConfigParser.SECTCRE.match(_strip_inline_comment(line)):
            return "ini"
        if "=" not in line and _YAML_LINE.fullmatch(line):
            return "yaml"
        return "flat"
    return "flat"


# --- reading and errors --------------------------------------------------------------------------

_COMMENTS = ("#", ";")
_YAML_LINE = re.compile(r"---|[A-Za-z_][\w.-]*\s*:(\s.*)?")
_FLAT_SECTION = "\x00flat"  # the synthetic section wrapped around a flat file for configparser
_NO_DEFAULT = "\x00default"  # no [DEFAULT] magic: a [DEFAULT] header is just an unknown section


def _error(message: str) -> PtqUsageError:
    """Always one line, whatever the values, reasons or keys it quotes contain."""
    return PtqUsageError(" ".join(part.strip() for part in message.splitlines() if part.strip()))


def _at(source: Path, line: int | None) -> str:
    return f"{source}:{line}" if line is not None else str(source)


def _show(key: str) -> str:
    """A key as typed, quoted when it is empty or holds spaces or unprintable characters."""
    if key and key.isprintable() and not any(c.isspace() for c in key):
        return key
    return repr(key)


def _read_text(source: Path) -> str:
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise _error(f"{source}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _error(
            f"{source}:{line}: cannot read: not UTF-8 text (byte 0x{data[exc.start]:02x})"
        ) from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not any(
        line.strip() and not line.strip().startswith(_COMMENTS) for line in text.split("\n")
    ):
        raise _error(f"{source}: empty file: no settings, only blank lines and comments")
    return text


# --- flat and INI via configparser ---------------------------------------------------------------


@dataclass
class _Section:
    name: str | None  # None: the flat form
    line: int | None
    entries: list[tuple[str, int | None, Any]]  # (key as written, line, raw value)


def _strip_inline_comment(line: str) -> str:
    """What configparser does with inline_comment_prefixes=("#",): cut at a `#` after a space."""
    for index, char in enumerate(line):
        if char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].strip()
    return line.strip()


def _locate(lines: list[str], section: str | None) -> list[tuple[str | None, int | None, dict]]:
    """Sections in file order with their header line and the first line of every key.

    configparser does not expose line numbers; this finds them with configparser's own rules
    (comment prefixes, inline comments, SECTCRE, the key is what precedes the first `=`).
    """
    found: list[tuple[str | None, int | None, dict]] = [(section, None, {})]
    for number, raw in enumerate(lines, 1):
        if not raw.strip() or raw.strip().startswith(_COMMENTS):
            continue
        line = _strip_inline_comment(raw)
        header = configparser.ConfigParser.SECTCRE.match(line)
        if header:
            found.append((header.group("header"), number, {}))
        elif "=" in line:
            found[-1][2].setdefault(line.split("=", 1)[0].strip(), number)
    return found if section is not None else found[1:]


def _first_line(located: list, section: str | None, key: str | None) -> int | None:
    for name, line, keys in located:
        if name == section:
            return line if key is None else keys.get(key)
    return None


def _ini_sections(source: Path, text: str, flat: bool) -> list[_Section]:
    # Every line stands alone: no indented continuation lines (converter_lite trims each line).
    lines = [line.lstrip() for line in text.split("\n")]
    parser = configparser.ConfigParser(
        delimiters=("=",),
        comment_prefixes=_COMMENTS,
        inline_comment_prefixes=("#",),
        strict=True,
        empty_lines_in_values=False,
        default_section=_NO_DEFAULT,
        interpolation=None,
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    shift = 1 if flat else 0
    head = [f"[{_FLAT_SECTION}]"] if flat else []
    located = _locate(lines, _FLAT_SECTION if flat else None)
    expect = "key=value" if flat else "key=value or a [section] header"
    try:
        parser.read_string("\n".join(head + lines), source=str(source))
    except configparser.DuplicateSectionError as exc:
        line = exc.lineno - shift if exc.lineno else None
        if flat:
            _section_in_flat(source, line, exc.section)
        first = _first_line(located, exc.section, None)
        raise _error(
            f"{_at(source, line)}: section [{_show(exc.section)}] given twice "
            f"(first on line {first})"
        ) from None
    except configparser.DuplicateOptionError as exc:
        line = exc.lineno - shift if exc.lineno else None
        first = _first_line(located, exc.section, exc.option)
        where = "" if exc.section == _FLAT_SECTION else f"[{_show(exc.section)}] "
        raise _error(
            f"{_at(source, line)}: {where}{_show(exc.option)} given twice (first on line {first})"
        ) from None
    except configparser.MissingSectionHeaderError as exc:
        raise _error(
            f"{_at(source, exc.lineno)}: cannot parse {exc.line.strip()!r}; expected a [section] "
            "header first"
        ) from None
    except configparser.ParsingError as exc:
        line = exc.errors[0][0] - shift
        raise _error(
            f"{_at(source, line)}: cannot parse {lines[line - 1].strip()!r}; expected {expect}"
        ) from None
    except configparser.Error as exc:  # anything newer Pythons may add
        raise _error(f"{source}: cannot parse: {exc}") from None
    sections = []
    for name, line, keys in located:
        if flat and name != _FLAT_SECTION:
            _section_in_flat(source, line, name)
        entries = [(key, at, parser.get(name, key, raw=True)) for key, at in keys.items()]
        sections.append(_Section(None if flat else name, line, entries))
    return sections


def _section_in_flat(source: Path, line: int | None, name: str | None) -> NoReturn:
    raise _error(
        f"{_at(source, line)}: section header [{_show(str(name))}] in a flat key=value config; "
        "a sectioned config starts with its first [section] header"
    )


# --- YAML ----------------------------------------------------------------------------------------


class _Pairs(list):
    """A YAML mapping value, kept as (key, value) pairs in file order."""


def _kind(node: yaml.Node) -> str:
    return "list" if isinstance(node, yaml.SequenceNode) else "mapping"


def _yaml_sections(source: Path, text: str) -> list[_Section]:
    looks_ini = _detect_by_content(text) != "yaml"  # YAML only because of the file name
    hint = " (.yaml/.yml files are read as YAML)" if looks_ini else ""
    try:
        document = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        reason = exc.problem or exc.context or "syntax error"
        if exc.context and reason.startswith("but "):  # "expected a ..., but found ..."
            reason = f"{exc.context}, {reason}"
        raise _error(f"{_at(source, line)}: not valid YAML: {reason}{hint}") from None
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        raise _error(f"{_at(source, line)}: not valid YAML: {exc.reason}{hint}") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise _error(f"{source}: not valid YAML: {exc}{hint}") from None
    if document is None:
        raise _error(f"{source}: empty file: no settings, only blank lines and comments")
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    allowed = _allowed_sections()
    if not isinstance(root, yaml.MappingNode):
        got = "a single value" if isinstance(root, yaml.ScalarNode) else f"a {_kind(root)}"
        raise _error(
            f"{_at(source, root.start_mark.line + 1)}: the top level must be a mapping of "
            f"sections, got {got}; allowed: {allowed}"
        )
    sections: list[_Section] = []
    seen: dict[str, int] = {}
    for key_node, value_node in root.value:
        line = key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode):
            raise _error(
                f"{_at(source, line)}: a section name must be a plain name; allowed: {allowed}"
            )
        name = key_node.value
        if name in seen:
            raise _error(
                f"{_at(source, line)}: section [{_show(name)}] given twice "
                f"(first on line {seen[name]})"
            )
        seen[name] = line
        # An unknown section is reported by _build, in file order with the other problems.
        entries = _yaml_entries(source, name, value_node) if name in _SECTIONED else []
        sections.append(_Section(name, line, entries))
    return sections


def _yaml_entries(source: Path, section: str, node: yaml.Node) -> list[tuple[str, int, Any]]:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return []  # `section:` with every key commented out
    if not isinstance(node, yaml.MappingNode):
        got = "a single value" if isinstance(node, yaml.ScalarNode) else f"a {_kind(node)}"
        raise _error(
            f"{_at(source, line)}: section [{section}] must be a mapping of key: value, got {got}"
        )
    entries: list[tuple[str, int, Any]] = []
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode):
            raise _error(f"{_at(source, line)}: [{section}] a key must be a plain name")
        key = key_node.value
        if key in seen:
            raise _error(
                f"{_at(source, line)}: [{section}] {_show(key)} given twice "
                f"(first on line {seen[key]})"
            )
        seen[key] = line
        entries.append((key, line, value_node))
    return entries


def _plain(node: Any, site: _Site, depth: int = 0) -> Any:
    """A YAML node as text (None for null), a list, or _Pairs; INI values are already text."""
    if not isinstance(node, yaml.Node):
        return node
    if depth > 3:
        site.fail("value is nested too deeply")
    if isinstance(node, yaml.ScalarNode):
        return None if node.tag == "tag:yaml.org,2002:null" else node.value
    if isinstance(node, yaml.SequenceNode):
        return [_plain(item, site, depth + 1) for item in node.value]
    pairs = _Pairs()
    for key, value in node.value:
        if not isinstance(key, yaml.ScalarNode):
            site.fail("a mapping key must be a plain name")
        pairs.append((key.value, _plain(value, site, depth + 1)))
    return pairs


# --- values --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Site:
    """Where a value came from, for messages."""

    source: Path
    line: int | None
    section: str | None
    key: str
    base: Path

    @property
    def label(self) -> str:
        return f"[{self.section}] {_show(self.key)}" if self.section else _show(self.key)

    def fail(self, text: str) -> NoReturn:
        raise _error(f"{_at(self.source, self.line)}: {self.label}: {text}")

    def text(self, value: Any, allowed: str) -> str:
        """One scalar, stripped, for an item of a list or mapping."""
        if value is None:
            return ""
        if not isinstance(value, str):
            kind = "mapping" if isinstance(value, _Pairs) else "list"
            self.fail(f"expected single values, got a nested YAML {kind}; allowed: {allowed}")
        return value.strip()

    def path(self, text: str) -> Path:
        return Path(os.path.abspath(self.base / text))


@dataclass(frozen=True)
class _Key:
    field: str
    parse: Callable[[Any, _Site], Any]
    allowed: str
    many: bool = False  # YAML lists / mappings accepted
    empty: Any = None  # the value of an empty setting; None: an empty setting is an error
    kept: bool = True  # False: checked for MindSpore compatibility, with nothing to keep
    key: str = ""  # the key as written, when it differs from the field (quant_strategy)

    def named(self, key: str) -> _Key:
        return replace(self, key=key)


def _checked(parse: Callable[[Any, _Site], Any]) -> Callable[[Any, _Site], Any]:
    """`parse` with the shared parsers' complaints located at the key."""

    def located(raw: Any, site: _Site) -> Any:
        try:
            return parse(raw, site)
        except values.Invalid as exc:
            site.fail(str(exc))

    return located


def _scalar(parse: Callable[[str], Any], allowed: str) -> tuple[Callable[[Any, _Site], Any], str]:
    return _checked(lambda text, site: parse(text)), allowed


def _int_key(name: str, low: int, high: int) -> _Key:
    return _Key(name, *_scalar(lambda t: values.integer(t, low, high),
                               values.allowed_range(low, high)))


def _real_key(name: str, low: float, high: float) -> _Key:
    return _Key(name, *_scalar(lambda t: values.real(t, low, high),
                               f"a number in {values.allowed_range(low, high)}"))


def _bool_key(name: str, strict: bool = False) -> _Key:
    return _Key(name, *_scalar(lambda t: values.boolean(t, strict),
                               "true, false" if strict else values.BOOLEAN_ALLOWED))


def _target_device(text: str) -> str:
    name = text.strip()
    if name.upper() in target.FOREIGN:
        raise values.Invalid(
            f"{name!r} has no meaning here (ptqconv targets onnxruntime's CPU provider); "
            f"allowed: {', '.join(target.TARGETS)} (CPU means auto)")
    if name.lower() in target.ALIASES:
        return target.ALIASES[name.lower()]
    return values.choice(name, target.TARGETS)


def _choice_key(name: str, options: tuple[str, ...]) -> _Key:
    return _Key(name, *_scalar(lambda t: values.choice(t, options), ", ".join(options)))


def _no_meaning(why: str) -> Callable[[str], Any]:
    """A documented MindSpore key whose every value needs a backend ptqconv does not target."""

    def refuse(text: str) -> Any:
        raise values.Invalid(f"{text!r} has no meaning here: {why}")

    return refuse


@_checked
def _vector(raw: str | list, site: _Site) -> tuple[float, ...]:
    if isinstance(raw, _Pairs):
        site.fail(f"a YAML mapping is not allowed; allowed: {_VECTOR_ALLOWED}")
    return values.reals(raw if isinstance(raw, str) else [site.text(v, _VECTOR_ALLOWED)
                                                          for v in raw], -1e9, 1e9)


_VECTOR_ALLOWED = "[v1, v2, v3] (3 channels) or [v1] (GRAY)"


_NAMES_ALLOWED = "node names separated by ',' (YAML: or a list)"


@_checked
def _names(raw: str | list, site: _Site) -> tuple[str, ...]:
    if isinstance(raw, _Pairs):
        site.fail(f"a YAML mapping is not allowed; allowed: {_NAMES_ALLOWED}")
    return values.names(raw if isinstance(raw, str)
                        else [site.text(i, _NAMES_ALLOWED) for i in raw])


@_checked
def _path(text: str, site: _Site) -> Path:
    return site.path(text)


@_checked
def _calibrate_path(raw: str | list, site: _Site) -> tuple[tuple[str, Path], ...]:
    allowed = values.NAME_DIRS_ALLOWED
    if isinstance(raw, _Pairs):  # YAML {input: dir}: names may hold ':' and ','
        given: Any = [(name.strip(), site.text(d, allowed)) for name, d in raw]
    elif isinstance(raw, str):
        given = raw
    else:
        given = [site.text(item, allowed) for item in raw if site.text(item, allowed)]
    return tuple((name, site.path(d)) for name, d in values.name_dirs(given))


@_checked
def _image_path(text: str, site: _Site) -> tuple[tuple[None, Path], ...]:
    dirs = values.items(text, what="directory", allowed=values.DIRS_ALLOWED)
    if not dirs:
        raise values.Invalid(f"no directory given; allowed: {values.DIRS_ALLOWED}")
    return tuple((None, site.path(d)) for d in dirs)


@_checked
def _input_shape(raw: str | list, site: _Site) -> tuple[tuple[str, tuple[int, ...]], ...]:
    allowed = values.SHAPES_ALLOWED
    if isinstance(raw, _Pairs):  # YAML {input: [1, 3, 8, 8]} or {input: "1,3,8,8"}
        given: Any = []
        for name, dims in raw:
            if isinstance(dims, _Pairs):
                site.fail(f"input {name!r}: dimensions as a YAML mapping; allowed: {allowed}")
            given.append((name, dims if isinstance(dims, str) or dims is None
                          else [site.text(d, allowed) for d in dims]))
    elif isinstance(raw, str):
        given = raw
    else:
        given = [site.text(item, allowed) for item in raw]
    return values.shapes(given)


def _keys(*keys: _Key) -> dict[str, _Key]:
    return {key.key or key.field: key for key in keys}


_METHOD_ALLOWED = ", ".join(METHODS)
_TARGET_DEVICE = _Key("target_device", *_scalar(_target_device, ", ".join(target.TARGETS)))
# docs/reference.md §1.
IMAGE_FORMATS = ("RGB", "GRAY", "BGR")
RESIZE_METHODS = ("LINEAR", "NEAREST", "CUBIC")
WEIGHT_STRATEGIES = ("MAX_MIN", "GPTQ")
DYNAMIC_STRATEGIES = ("ALWC", "ACWL")
# converter_lite sections of other backends, and what they configure.
_FOREIGN_SECTIONS = {
    "ascend_context": "MindSpore's Ascend backend",
    "acl_option_cfg_param": "MindSpore's Ascend backend",
    "cpu_option_cfg_param": "MindSpore Lite's ARM64 kernels",
    "micro_param": "MindSpore Micro's code generation",
    "gpu_context": "MindSpore's GPU backend",
    "registry": "converter_lite's extension plugins",
}

_SECTIONED: dict[str | None, dict[str, _Key]] = {
    "common_quant_param": _keys(
        _Key("quant_type", *_scalar(values.quant_type, values.QUANT_TYPE_ALLOWED)),
        _int_key("bit_num", 0, 16),  # 0: mixed bit (WEIGHT_QUANT)
        _int_key("min_quant_weight_size", 0, U16_MAX),
        _int_key("min_quant_weight_channel", 0, U16_MAX),
        _Key("skip_quant_node", _names, _NAMES_ALLOWED, many=True, empty=()),
        _Key("debug_info_save_path", _path, "a directory"),
        _TARGET_DEVICE,
        # MindSpore packs integers below 8 bits; ONNX int4/int2 tensors are always packed.
        _bool_key("enable_encode"),
    ),
    "data_preprocess_param": _keys(
        _Key("calibrate_path", _calibrate_path, values.NAME_DIRS_ALLOWED, many=True),
        _int_key("calibrate_size", 1, U16_MAX),
        _choice_key("input_type", ("BIN", "IMAGE")),
        _Key("input_shape", _input_shape, values.SHAPES_ALLOWED, many=True),
        _choice_key("image_to_format", IMAGE_FORMATS),
        _Key("normalize_mean", _vector, _VECTOR_ALLOWED, many=True),
        _Key("normalize_std", _vector, _VECTOR_ALLOWED, many=True),
        _int_key("resize_width", 1, U16_MAX),
        _int_key("resize_height", 1, U16_MAX),
        _choice_key("resize_method", RESIZE_METHODS),
        _int_key("center_crop_width", 1, U16_MAX),
        _int_key("center_crop_height", 1, U16_MAX),
    ),
    "full_quant_param": _keys(
        _Key("activation_quant_method", *_scalar(lambda t: values.choice(t, METHODS),
                                                 _METHOD_ALLOWED)),
        _bool_key("bias_correction"),
        _bool_key("per_channel"),
        _bool_key("reduce_range"),
        _bool_key("smooth_quant"),
        _bool_key("equalize"),
        _bool_key("latency_aware"),
        _bool_key("measure_latency"),
        _bool_key("embedding_quant"),
        _bool_key("histogram_sampling"),
        _bool_key("shallow_convs_8bit"),
        _bool_key("dynamic_candidate"),
        _int_key("activation_bit_num", 1, 8),
        _int_key("thread_num", 1, 64),
        # MindSpore's docs put target_device here too.
        _TARGET_DEVICE,
        # Micro's switch to quantize every supported op, which ptqconv always does.
        replace(_bool_key("enable_all_ops"), kept=False),
        _Key("encodings_path", _path, "an encodings file (AIMET / QNN JSON)"),
        _choice_key("quant_strategy", QUANT_STRATEGIES),
    ),
    "weight_quant_param": _keys(
        _bool_key("weight_per_channel").named("per_channel"),
        _bool_key("weight_bias_correction").named("bias_correction"),
        _choice_key("weight_quant_strategy", WEIGHT_STRATEGIES).named("quant_strategy"),
        _Key("dequant_strategy", *_scalar(_no_meaning(
            "ON_THE_FLY is dequantization at run time on Ascend; ptqconv's DequantizeLinear "
            "nodes already dequantize at run time on onnxruntime's CPU provider"), "-")),
        _Key("block_size", *_scalar(values.block_size, values.BLOCK_SIZE_ALLOWED)),
        _bool_key("weight_measure_latency").named("measure_latency"),
        _bool_key("keep_kernel_sums"),
        _bool_key("weight_shallow_convs_8bit").named("shallow_convs_8bit"),
    ),
    "mixed_bit_weight_quant_param": _keys(
        _Key("init_scale", *_scalar(lambda t: values.real(t, 0.0, 1.0, open_interval=True),
                                    "a number in (0, 1)")),
        _bool_key("auto_tune"),
        _int_key("max_iterations", 40, U16_MAX),
    ),
    "dynamic_quant_param": _keys(
        _choice_key("dynamic_quant_strategy", DYNAMIC_STRATEGIES).named("quant_strategy"),
        _bool_key("dynamic_measure_latency").named("measure_latency"),
    ),
    "evaluate_param": _keys(
        _Key("eval_path", _calibrate_path, values.NAME_DIRS_ALLOWED, many=True),
        _int_key("eval_size", 1, U16_MAX),
        _real_key("accuracy_threshold", 0.0, 1e6),
        _real_key("cosine_threshold", -1.0, 1.0),
    ),
}

# flat key -> QuantConfig field and parser; converter_lite r0.7-r1.3.
_FLAT_KEYS: dict[str, _Key] = {
    "image_path": _Key("calibrate_path", _image_path, values.DIRS_ALLOWED),
    "batch_count": _int_key("calibrate_size", 1, U16_MAX),
    "method_x": _Key("activation_quant_method",
                     *_scalar(lambda t: values.choice(t, METHODS), _METHOD_ALLOWED)),
    "thread_num": _int_key("thread_num", 1, 64),
    "bias_correction": _bool_key("bias_correction", strict=True),
    "input_shape": _Key("input_shape", _input_shape, values.SHAPES_ALLOWED),
}

_HOME = {key: section for section, keys in _SECTIONED.items() for key in keys}


def _allowed_sections() -> str:
    return ", ".join(f"[{name}]" for name in sorted(s for s in _SECTIONED if s))


def _unknown_key_hint(key: str, section: str | None) -> str:
    if section is None:
        if key in _HOME:
            return (
                f" ({key} is a sectioned-form key: start the file with a [{_HOME[key]}] header "
                "to use that form)"
            )
        return ""
    if key in _HOME:
        return f" ({key} belongs in [{_HOME[key]}])"
    if key in _FLAT_KEYS:
        target = _FLAT_KEYS[key].field
        return f" ({key} is the flat-form name; use {target} in [{_HOME[target]}])"
    return ""


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or value == []


def _build(
    source: Path,
    fmt: str,
    base: Path,
    sections: list[_Section],
    schema: Mapping[str | None, Mapping[str, _Key]],
) -> QuantConfig:
    given: dict[str, Any] = {}
    lines: dict[str, int] = {}
    labels: dict[str, str] = {}
    for section in sections:
        if section.name not in schema:
            foreign = _FOREIGN_SECTIONS.get(str(section.name))
            why = (f" ({foreign}, which has no meaning here: ptqconv writes ONNX for "
                   "onnxruntime's CPU provider)" if foreign else "")
            raise _error(
                f"{_at(source, section.line)}: unknown section [{_show(str(section.name))}]"
                f"{why}; allowed: {_allowed_sections()}"
            )
        known = schema[section.name]
        for key, line, raw in section.entries:
            site = _Site(source, line, section.name, key, base)
            spec = known.get(key)
            if spec is None:
                where = f"[{section.name}] " if section.name else ""
                raise _error(
                    f"{_at(source, line)}: {where}{_show(key)} is not supported; allowed keys: "
                    f"{', '.join(sorted(known))}{_unknown_key_hint(key, section.name)}"
                )
            value = _plain(raw, site)
            if _is_empty(value):
                if spec.empty is None:
                    site.fail(f"empty value; allowed: {spec.allowed}")
                parsed = spec.empty
            elif isinstance(value, str):
                parsed = spec.parse(value.strip(), site)
            elif spec.many:
                parsed = spec.parse(value, site)
            else:
                kind = "mapping" if isinstance(value, _Pairs) else "list"
                site.fail(f"expected one value, got a YAML {kind}; allowed: {spec.allowed}")
            if spec.field in labels:  # a key two sections accept (target_device)
                first = lines.get(spec.field)
                site.fail(f"given twice (first as {labels[spec.field]}"
                          f"{f' on line {first}' if first else ''})")
            if spec.kept:
                given[spec.field] = parsed
            if line is not None:
                lines.setdefault(key, line)  # a field of the same name wins
                lines[spec.field] = line
            labels[spec.field] = site.label
    return QuantConfig(
        source=source,
        format=fmt,
        lines=MappingProxyType(lines),
        keys=MappingProxyType(labels),
        **given,
    )
