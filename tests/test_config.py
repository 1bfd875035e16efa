"""salve.config: every field's validation generated from the schema, overrides, the CLI's errors."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from salve.config import Config, ConfigError, from_dict, load, section_fields, sections
from salve.params_file import apply_overrides, fill_missing, parse_override, yaml_load

REPO = Path(__file__).resolve().parents[1]

# Values that satisfy the cross-field rules whatever single field is being varied.
_CONTEXT: dict[str, dict] = {
    "data": {"path": "some/folder"},
    "finetune": {"weights": "weights/model.safetensors"},
}


def _all_fields() -> list[tuple[str, str, type, dataclasses.Field]]:
    out = []
    for name, cls in sections().items():
        for key, (typ, fld) in section_fields(cls).items():
            out.append((name, key, typ, fld))
    return out


FIELDS = _all_fields()
FIELD_IDS = [f"{s}.{k}" for s, k, _, _ in FIELDS]


def _raw(section: str, key: str, value) -> dict:
    raw = {s: dict(v) for s, v in _CONTEXT.items()}
    raw.setdefault(section, {})[key] = value
    return raw


def _wrong_types(typ: type) -> list:
    return {
        int: ["3", 2.5, True, None, [1]],
        float: ["0.5", True, None, [0.5]],
        str: [3, 1.5, True, None, ["a"]],
        bool: ["yes", "true", 1, 0, None],
    }[typ]


def _out_of_range(fld: dataclasses.Field, typ: type) -> list:
    meta = fld.metadata
    bad = []
    if meta["choices"] is not None:
        bad.append("definitely-not-a-choice")
    if meta["min"] is not None:
        lo = meta["min"]
        bad.append(lo if meta["min_exclusive"] else (lo - 1 if typ is int else lo - 1e-6))
    if meta["max"] is not None:
        hi = meta["max"]
        bad.append(hi + 1 if typ is int else hi + 1e-6)
    if typ is float:
        bad += [math.nan, math.inf, -math.inf, 10**400]  # the last overflows float()
    return bad


def _in_range(fld: dataclasses.Field, typ: type) -> list:
    meta = fld.metadata
    good = list(meta["choices"] or ())
    if meta["min"] is not None and not meta["min_exclusive"]:
        good.append(typ(meta["min"]))
    if meta["max"] is not None:
        good.append(typ(meta["max"]))
    return good


def test_schema_is_nonempty_and_every_field_is_typed_and_documented() -> None:
    assert set(sections()) == {f.name for f in dataclasses.fields(Config)}
    assert len(FIELDS) > 40
    for section, key, typ, fld in FIELDS:
        assert typ in (int, float, str, bool), f"{section}.{key}: unsupported type {typ}"
        assert fld.metadata["help"], f"{section}.{key} has no help text"


@pytest.mark.parametrize(("section", "key", "typ", "fld"), FIELDS, ids=FIELD_IDS)
def test_every_field_rejects_wrong_type(section, key, typ, fld) -> None:
    for value in _wrong_types(typ):
        with pytest.raises(ConfigError) as info:
            from_dict(_raw(section, key, value))
        assert f"{section}.{key}" in str(info.value), (value, str(info.value))
        assert "expected" in str(info.value)


@pytest.mark.parametrize(("section", "key", "typ", "fld"), FIELDS, ids=FIELD_IDS)
def test_every_field_rejects_out_of_range_and_accepts_its_limits(section, key, typ, fld) -> None:
    for value in _out_of_range(fld, typ):
        with pytest.raises(ConfigError) as info:
            from_dict(_raw(section, key, value))
        assert f"{section}.{key}" in str(info.value), (value, str(info.value))
    for value in _in_range(fld, typ):
        cfg = from_dict(_raw(section, key, value))
        got = getattr(getattr(cfg, section), key)
        assert got == value and type(got) is typ


@pytest.mark.parametrize(("section", "key", "typ", "fld"), FIELDS, ids=FIELD_IDS)
def test_every_default_satisfies_its_own_constraints(section, key, typ, fld) -> None:
    default = getattr(getattr(Config(), section), key)
    assert type(default) is typ or (fld.metadata["auto"] and default == "auto")
    cfg = from_dict(_raw(section, key, default))
    assert getattr(getattr(cfg, section), key) == default


def test_auto_fields_take_auto_or_their_type_and_nothing_else() -> None:
    assert from_dict(_raw("finetune", "min_steps", "auto")).finetune.min_steps == "auto"
    assert from_dict(_raw("finetune", "min_steps", 7)).finetune.min_steps == 7
    with pytest.raises(ConfigError, match=r"finetune\.min_steps: expected int or 'auto'"):
        from_dict(_raw("finetune", "min_steps", "Auto"))
    with pytest.raises(ConfigError, match="auto"):  # only fields marked auto take it
        from_dict(_raw("finetune", "epochs", "auto"))


def test_float_fields_accept_ints_and_store_floats() -> None:
    cfg = from_dict({"sae": {"l1": 0, "lr": 1}, "rank": {"cross_class_fraction": 1}})
    assert cfg.sae.l1 == 0.0 and type(cfg.sae.l1) is float
    assert cfg.sae.lr == 1.0 and type(cfg.sae.lr) is float
    assert cfg.rank.cross_class_fraction == 1.0


def test_exclusive_minimum_is_exclusive_and_inclusive_minimum_inclusive() -> None:
    with pytest.raises(ConfigError, match=r"sae\.lr.*> 0"):
        from_dict({"sae": {"lr": 0.0}})
    assert from_dict({"sae": {"lr": 1e-12}}).sae.lr == 1e-12
    assert from_dict({"sae": {"l1": 0.0}}).sae.l1 == 0.0
    with pytest.raises(ConfigError, match=r"sae\.l1.*>= 0"):
        from_dict({"sae": {"l1": -1e-12}})


def test_unknown_section_and_unknown_key() -> None:
    with pytest.raises(ConfigError, match="unknown section 'saes'") as info:
        from_dict({"saes": {"width": 3}})
    assert "sae" in str(info.value)  # lists the allowed sections
    with pytest.raises(ConfigError, match=r"unknown key sae\.widht") as info:
        from_dict({"sae": {"widht": 3}})
    assert "width" in str(info.value)  # lists the allowed keys
    with pytest.raises(ConfigError, match="'sae' must be a mapping"):
        from_dict({"sae": 3})
    with pytest.raises(ConfigError, match="mapping of sections"):
        from_dict([1, 2])


def test_cross_field_rules() -> None:
    with pytest.raises(ConfigError, match=r"data\.path must name a folder"):
        from_dict({"data": {"source": "imagefolder", "path": " "}})
    assert from_dict({"data": {"source": "imagefolder", "path": "x"}}).data.path == "x"

    for arch in ("ResNet", "1net", "vit-b-16", ""):
        with pytest.raises(ConfigError, match=r"finetune\.arch"):
            from_dict({"finetune": {"arch": arch}})
    with pytest.raises(ConfigError, match=r"multiple of 32 for vit_b_32"):
        from_dict({"finetune": {"arch": "vit_b_32"}, "data": {"image_size": 48}})

    for weights in ("/abs/model.safetensors", "model.safetensors", "weights/../x", "data/x"):
        with pytest.raises(ConfigError, match=r"finetune\.weights=.*under weights/"):
            from_dict({"finetune": {"weights": weights}})
    assert from_dict({"finetune": {"weights": "weights/sub/m.safetensors"}})
    with pytest.raises(ConfigError, match=r"finetune\.epochs=0 explains"):
        from_dict({"finetune": {"epochs": 0, "weights": "imagenet"}})
    assert from_dict({"finetune": {"epochs": 0, "weights": "weights/m.safetensors"}})

    with pytest.raises(ConfigError, match=r"data\.image_size=40.*multiple of 16"):
        from_dict({"finetune": {"arch": "vit_b_16"}, "data": {"image_size": 40}})
    assert from_dict({"finetune": {"arch": "vit_b_16"}, "data": {"image_size": 48}})
    assert from_dict({"finetune": {"arch": "resnet18"}, "data": {"image_size": 40}})

    for kind in ("topk", "batchtopk"):
        with pytest.raises(ConfigError, match=r"sae\.k=9 must be <= sae\.width=8"):
            from_dict({"sae": {"kind": kind, "k": 9, "width": 8}})
        assert from_dict({"sae": {"kind": kind, "k": 8, "width": 8}}).sae.k == 8
    # k is irrelevant for the other kinds
    assert from_dict({"sae": {"kind": "relu", "k": 9, "width": 8}}).sae.width == 8

    with pytest.raises(ConfigError, match=r"alpha_crit\.grid_min=5\.0 must be below"):
        from_dict({"alpha_crit": {"grid_min": 5.0, "grid_max": 5.0}})
    assert from_dict({"alpha_crit": {"grid_min": 4.0, "grid_max": 5.0}}).alpha_crit.grid_min == 4


def test_defaults_load() -> None:
    assert from_dict({}) == Config()
    assert from_dict(None) == Config()
    assert from_dict({"sae": None}) == Config()
    assert Config().to_dict()["sae"]["kind"] == "relu"


def test_repo_params_yaml_loads_with_its_values() -> None:
    raw = YAML(typ="safe").load((REPO / "params.yaml").read_text())  # as DVC reads it
    cfg = load(REPO / "params.yaml")
    assert from_dict(raw) == cfg
    as_dict = cfg.to_dict()
    for section, values in raw.items():
        for key, value in values.items():
            assert as_dict[section][key] == value, f"{section}.{key}"


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("sae: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(bad)
    bad.write_text("sae:\n  width: 8\n  width: 9\n")  # duplicate key: DVC rejects it too
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(bad)


# (file text, where the error points, what the one line says)
BROKEN_FILES = {
    "duplicate key": (
        "sae:\n  width: 8\n  k: 3\n  width: 9\n",
        ":4:3: ",
        "key 'width' appears twice in its section (first at line 2); keep one of them",
    ),
    "duplicate section": (
        "sae:\n  width: 8\nrank:\n  top_n: 2\nsae:\n  k: 3\n",
        ":5:1: ",
        "section 'sae' appears twice (first at line 1); merge the two into one",
    ),
    "unclosed bracket": ("# c\nsae: {width: 8\n", ":2:6: ", "not closed before the file ends"),
    "unclosed quote": ("sae:\n  kind: 'relu\n", ":2:9: ", "not closed before the file ends"),
    "bad indentation": ("sae:\n  width: 8\n   k: 3\n", ":3:5: ", "check the indentation"),
    "tab": ("sae:\n\twidth: 8\n", ":2:1: ", "a tab character"),
    "two documents": ("sae: {}\n---\nrank: {}\n", ":2:1: ", "a second YAML document"),
    "a list": ("# params\n\n- sae\n- rank\n", ":3:1: ", "expected a mapping of sections"),
    "a plain value": ("sae\n", ":1:1: ", "got the single value 'sae'"),
    "empty": ("", " is empty ", "`git checkout params.yaml`"),
    "only comments": ("# all\n\n   # gone\n", " is empty ", "`echo 'data:' > params.yaml`"),
    "null": ("~\n", " is empty ", "salve run then writes every key with its default"),
}


@pytest.mark.parametrize("case", BROKEN_FILES, ids=list(BROKEN_FILES))
def test_a_broken_params_file_is_one_line_with_its_place(tmp_path: Path, case: str) -> None:
    """Syntax errors and duplicates point at line:column (1-based) instead of ruamel's 8-12
    lines; an empty file is refused instead of running every default."""
    text, place, says = BROKEN_FILES[case]
    p = tmp_path / "params.yaml"
    p.write_text(text)
    for attempt in (load, lambda q: apply_overrides(q, ["sae.width=4"]), fill_missing):
        with pytest.raises(ConfigError) as info:
            attempt(p)
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{p}{place}"), message
        assert says in message, message
        assert "<unicode string>" not in message and "suppress" not in message  # ruamel's
        assert p.read_text() == text  # nothing written


def test_a_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_bytes(b"sae:\n  kind: \xe9\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 13 .*save it as UTF-8$"):
        load(p)


def test_load_reads_exponent_floats_as_dvc_does(tmp_path: Path) -> None:
    """YAML 1.2 (DVC's ruamel): `1e-3` is a float, not the string PyYAML would make of it."""
    p = tmp_path / "params.yaml"
    p.write_text("sae:\n  l1: 1e-3\n  lr: 2E-4\nrank:\n  min_mean_fraction: 1e-10\n")
    cfg = load(p)
    assert cfg.sae.l1 == 1e-3 and cfg.sae.lr == 2e-4 and cfg.rank.min_mean_fraction == 1e-10


# --------------------------------------------------------------------------------------------
# overrides


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sae.width=128", ("sae", "width", 128)),
        ("sae.l1=1e-2", ("sae", "l1", 0.01)),
        ("sae.l1=0.5", ("sae", "l1", 0.5)),
        ("finetune.augment=true", ("finetune", "augment", True)),
        ("finetune.augment=False", ("finetune", "augment", False)),
        ("finetune.weights=none", ("finetune", "weights", "none")),
        ("data.path=", ("data", "path", "")),
        ("data.path=a=b", ("data", "path", "a=b")),
        ("sae.kind=topk", ("sae", "kind", "topk")),
    ],
)
def test_parse_override_types_values_like_dvc(text, expected) -> None:
    got = parse_override(text)
    assert got == expected
    assert type(got[2]) is type(expected[2])


@pytest.mark.parametrize("text", ["sae", "sae=3", "width=3", "sae.width=[1"])
def test_parse_override_rejects_malformed(text) -> None:
    with pytest.raises(ConfigError, match="--set"):
        parse_override(text)


@pytest.fixture
def params_copy(tmp_path: Path) -> Path:
    p = tmp_path / "params.yaml"
    p.write_bytes((REPO / "params.yaml").read_bytes())
    return p


def test_apply_overrides_writes_typed_values_and_keeps_comments(params_copy: Path) -> None:
    before = params_copy.read_text().splitlines()
    cfg = apply_overrides(
        params_copy,
        ["sae.width=128", "sae.l1=1e-2", "sae.kind=topk", "rank.min_mean_fraction=1e-10"],
    )
    assert (cfg.sae.width, cfg.sae.l1, cfg.sae.kind) == (128, 0.01, "topk")
    assert type(cfg.sae.width) is int and type(cfg.sae.l1) is float
    # the file now holds the values, YAML-typed, and loads to the same config
    raw = yaml_load(params_copy.read_text())
    assert raw["sae"]["width"] == 128 and type(raw["sae"]["width"]) is int
    assert load(params_copy) == cfg
    assert load(params_copy).rank.min_mean_fraction == 1e-10

    after = params_copy.read_text().splitlines()
    assert len(after) == len(before)
    changed = {i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b}
    keys = [before[i].split(":")[0].strip() for i in sorted(changed)]
    assert keys == ["kind", "width", "l1", "min_mean_fraction"]
    for i in changed:  # a changed line keeps its own comment
        if "#" in before[i]:
            assert after[i].endswith(before[i][before[i].index("#") :])
    kind_line = next(line for line in after if line.strip().startswith("kind: topk"))
    assert kind_line.endswith("# linear (the paper's) | relu | topk | batchtopk | jumprelu")
    # every comment-only line (the header) survives verbatim
    assert [x for x in before if x.startswith("#")] == [x for x in after if x.startswith("#")]


def test_apply_overrides_adds_missing_section_and_key(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text("# my params\nsae:\n  width: 16  # narrow\n")
    cfg = apply_overrides(p, ["rank.top_n=3", "sae.epochs=7"])
    assert cfg.rank.top_n == 3 and cfg.sae.epochs == 7 and cfg.sae.width == 16
    text = p.read_text()
    assert text.startswith("# my params\n") and "width: 16  # narrow" in text
    assert load(p) == cfg


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["sae.width=128", "sae.l1=-1"], "sae.l1"),
        (["sae.width=abc"], "sae.width"),
        (["sae.width=1.5"], "sae.width"),
        (["finetune.augment=yes"], "finetune.augment"),  # YAML 1.2: a string, as for DVC
        (["sae.kind=topk", "sae.k=65"], "sae.k"),
        (["sae.nokey=1"], "sae.nokey"),
        (["nosection.key=1"], "nosection"),
        (["sae.width"], "sae.width"),
    ],
)
def test_invalid_override_raises_and_leaves_file_byte_identical(
    params_copy: Path, overrides, named
) -> None:
    before = params_copy.read_bytes()
    with pytest.raises(ConfigError) as info:
        apply_overrides(params_copy, overrides)
    assert named in str(info.value)
    assert params_copy.read_bytes() == before
    assert sorted(x.name for x in params_copy.parent.iterdir()) == ["params.yaml"]


def test_override_into_non_mapping_section_is_a_config_error(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text("sae: 3\n")
    with pytest.raises(ConfigError, match="'sae' must be a mapping"):
        apply_overrides(p, ["sae.width=8"])
    assert p.read_text() == "sae: 3\n"


# --------------------------------------------------------------------------------------------
# the command line


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "--root", str(root), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("params_text", "named"),
    [
        ("sae:\n  width: -3\n", "sae.width"),
        ("finetune:\n  lr: fast\n", "finetune.lr"),
        ("common:\n  devise: cpu\n", "common.devise"),
        ("sae:\n  kind: topk\n  k: 9\n  width: 8\n", "sae.k"),
    ],
)
def test_cli_bad_params_exits_2_with_one_line(tmp_path: Path, params_text, named) -> None:
    (tmp_path / "params.yaml").write_text(params_text)
    proc = _cli(tmp_path, "run")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert named in lines[0] and lines[0].startswith("error:")
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_bad_set_exits_2_and_leaves_params_alone(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_bytes((REPO / "params.yaml").read_bytes())
    before = p.read_bytes()
    proc = _cli(tmp_path, "run", "--set", "sae.width=0")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "sae.width" in lines[0]
    assert "Traceback" not in proc.stderr
    assert p.read_bytes() == before
