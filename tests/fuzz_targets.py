"""Fuzz targets shared by the test suite (a few dozen inputs each) and benchmarks/fuzz.py (10,000 each).

A target is a hypothesis strategy of inputs and a ``run`` that feeds one input to a loader, an API entry
point or the CLI. The contract every target checks: the only exception is ``ValueError`` (or a subclass),
and whatever is returned is finite and >= 0 where it is a time, a rate or a size.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from hypothesis import strategies as st

import moeplan as mp
from moeplan.cli import main as cli_main
from moeplan.profiles import profile_from_upload
from moeplan.validation import collective_rows, load_points, relative_rows, training_rows

ROOT = Path(__file__).resolve().parent.parent
_DELETE = object()


@dataclass(frozen=True)
class Target:
    name: str
    inputs: st.SearchStrategy
    run: object  # callable(input) -> None; raises ValueError on bad input, AssertionError on a wrong result


# ------------------------------------------------------------------ documents
LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.lists(st.integers(-2, 20), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.sampled_from(["3.35e12", "1e-6", "-5e10", "nan", ".inf", "4x4", "1e300", "0"]),
)
EDITS = st.lists(st.tuples(st.integers(0, 10**6), st.one_of(st.just(_DELETE), LEAVES)), min_size=1, max_size=3)


def _paths(node, prefix=()):
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield prefix + (key,)
        yield from _paths(value, prefix + (key,))


def mutate(doc, edits):
    """``doc`` with each edit applied: a leaf or subtree replaced by a value, or deleted."""
    doc = copy.deepcopy(doc)
    for index, value in edits:
        paths = list(_paths(doc))
        if not paths:
            return doc
        path = paths[index % len(paths)]
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if value is _DELETE:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    return doc


def _yaml_file(doc, suffix=".yaml") -> Path:
    folder = Path(tempfile.mkdtemp(prefix="moeplan-fuzz-"))
    path = folder / f"doc{suffix}"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _bundled(folder: str, name: str):
    return yaml.safe_load((ROOT / folder / f"{name}.yaml").read_text())


TEXT_EDITS = st.tuples(st.integers(0, 10**6), st.text(max_size=12), st.booleans())


def _text_mutation(text: str, edit) -> str:
    """A slice of junk written over the text, or a line repeated (a duplicate key)."""
    at, junk, repeat = edit
    at %= max(len(text), 1)
    if repeat:
        lines = text.splitlines(keepends=True)
        i = at % len(lines)
        return "".join(lines[: i + 1] + [lines[i]] + lines[i + 1:])
    return text[:at] + junk + text[at + len(junk):]


# ------------------------------------------------------------------ loaders
def _run_topology(value):
    kind, base, change = value
    path = _yaml_file(mutate(_bundled("topologies", base), change)) if kind == "doc" else _text(
        "topologies", base, change)
    topo = mp.load_topology(str(path))
    assert topo.num_devices >= 1 and math.isfinite(topo.bisection_bw_bytes_per_s())


def _text(folder, base, edit) -> Path:
    text = _text_mutation((ROOT / folder / f"{base}.yaml").read_text(), edit)
    path = Path(tempfile.mkdtemp(prefix="moeplan-fuzz-")) / "doc.yaml"
    path.write_text(text)
    return path


def _doc_or_text(bases):
    return st.one_of(st.tuples(st.just("doc"), st.sampled_from(bases), EDITS),
                     st.tuples(st.just("text"), st.sampled_from(bases), TEXT_EDITS))


def _run_model(value):
    kind, base, change = value
    path = _yaml_file(mutate(_bundled("models", base), change)) if kind == "doc" else _text("models", base, change)
    model = mp.load_model(str(path))
    counts = mp.param_counts(model)
    assert all(math.isfinite(v) and v >= 0 for v in counts.values())


_PROFILE = yaml.safe_load((ROOT / "profiles" / "cpu-host.yaml").read_text())


def _run_profile(value):
    kind, change = value
    if kind == "doc":
        data = yaml.safe_dump(mutate(_PROFILE, change)).encode()
    else:
        data = _text_mutation((ROOT / "profiles" / "cpu-host.yaml").read_text(), change).encode()
    profile = profile_from_upload("fuzz.yaml", data)
    assert 0 < profile.compute.matmul <= 1 and profile.device_count >= 1


_POINTS = yaml.safe_load(yaml.safe_dump(  # a few points of each kind: a small published file
    {"points": [p for p in load_points() if p["id"] in ("C1", "A1", "A10", "A11", "T7", "T9")]}))


def _run_validation(change):
    path = _yaml_file(mutate(_POINTS, change))
    points = load_points(path)
    rows = collective_rows(points)[0] + training_rows(points)[0] + relative_rows(points)
    assert all(math.isfinite(r.error) and r.predicted >= 0 for r in rows)


# ------------------------------------------------------------------ API entry points
SIZES = st.one_of(st.integers(-5, 70_000), st.integers(-(10**12), 10**12), st.floats(allow_nan=True),
                  st.sampled_from([0, 1, 2, 3, 8, 64, 1024, True, None, "8", 2.5]))
PLAUSIBLE = st.sampled_from([1, 2, 4, 8, 16, 64])
MOSTLY_PLAUSIBLE = st.one_of(PLAUSIBLE, PLAUSIBLE, PLAUSIBLE, SIZES)  # three in four inputs are sensible sizes
_MODEL = mp.load_model("st-moe-like-8b").with_(n_layers=4)
_TOPOS = [mp.load_topology("dgx-h100"), mp.load_topology("tpu-v5e", shape=(4, 4)), mp.load_topology("cpu-host")]


def _model_kwargs():
    names = ("d_model", "n_layers", "num_experts", "top_k", "expert_d_ff", "moe_every", "seq_len", "d_ff",
             "num_shared_experts", "first_dense_layers", "n_heads", "n_kv_heads")
    return st.dictionaries(st.sampled_from(names + ("capacity_factor",)), MOSTLY_PLAUSIBLE, max_size=3)


def _run_model_api(kwargs):
    mp.param_counts(_MODEL.with_(**kwargs))


def _layout_kwargs():
    names = ("data", "fsdp", "expert", "tensor", "pipeline", "virtual_pipeline", "micro_batch_size")
    return st.fixed_dictionaries({}, optional={n: MOSTLY_PLAUSIBLE for n in names if n != "data"} | {
        "data": SIZES,
        "recompute": st.sampled_from(["none", "selective", "full", "offload", "offload_projections", "offload_inputs",
                                      "most", 1]),
        "sequence_parallel": st.sampled_from([True, False, "no", 0])})


def _run_estimate(value):
    topo_i, model_kw, layout_kw, batch, mode = value
    topo = _TOPOS[topo_i]
    model = _MODEL.with_(**model_kw)
    rest = 1
    for k in ("fsdp", "tensor", "pipeline"):
        rest *= layout_kw.get(k, 1) if isinstance(layout_kw.get(k, 1), int) else 1
    if "data" not in layout_kw and rest > 0 and topo.num_devices % rest == 0:  # fill the devices, as users do
        layout_kw = {**layout_kw, "data": topo.num_devices // rest}
    layout = mp.Layout(**layout_kw)
    est = mp.estimate(model, topo, layout, batch, mode=mode)
    assert math.isfinite(est.step_time_s) and est.step_time_s > 0 and est.memory_per_device_bytes >= 0
    assert all(math.isfinite(r.time_s) and r.time_s >= 0 for r in est.layers)


def _run_collective(value):
    topo_i, op, size, devices = value
    t = mp.collective_time_s(_TOPOS[topo_i], op, size, devices=devices)
    assert np.all(np.isfinite(t)) and np.all(np.asarray(t) >= 0)


def _run_search(value):
    topo_i, knobs, batch, objective = value
    result = mp.search(_MODEL, _TOPOS[topo_i], mp.SearchSpace(**knobs), global_batch_tokens=batch,
                       objective=objective, max_points=200_000)
    for row in result.table:
        assert all(math.isfinite(row[k]) and row[k] >= 0 for k in ("step_time_s", "tokens_per_s", "loss"))


def _run_predict_loss(value):
    model_kw, tokens, group, eval_cf = value
    q = mp.predict_loss(_MODEL.with_(**model_kw), tokens, group_tokens=group, eval_capacity_factor=eval_cf)
    assert math.isfinite(q.loss) and q.low <= q.loss <= q.high


SMALL_LISTS = st.lists(MOSTLY_PLAUSIBLE, min_size=0, max_size=3)

# ------------------------------------------------------------------ CLI
WORDS = ["show", "collective", "estimate", "search", "models", "topologies", "dgx-h100", "tpu-v5p", "tpu-v9",
         "--nodes", "--shape", "--topology", "--model", "mixtral-8x7b", "st-moe-like-8b", "nope.yaml",
         "--batch-tokens", "--layout", "--bytes", "--experts", "--top-k", "--json", "--quiet", "all_reduce",
         "all_to_all", "4x4x8", "3x3", "0", "-1", "8", "65536", "1e300", "nan", "data=8", "data=3,expert=2",
         "1e6..1e9", "--capacity-factor", "dropless", "--mode", "decode", "--d-model", "--budget-days"]


def _run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli_main(argv)
        except SystemExit:  # argparse's usage error
            pass
    assert "Traceback" not in err.getvalue()


TARGETS = [
    Target("topology files", _doc_or_text(["tpu-v5p", "dgx-h100", "gb200-nvl72", "cpu-host"]), _run_topology),
    Target("model files", _doc_or_text(["st-moe-like-8b", "mixtral-8x7b", "deepseek-v3"]), _run_model),
    Target("profiles (uploads)", st.one_of(st.tuples(st.just("doc"), EDITS), st.tuples(st.just("text"), TEXT_EDITS)),
           _run_profile),
    Target("validation file", EDITS, _run_validation),
    Target("MoEModel", _model_kwargs(), _run_model_api),
    Target("estimate", st.tuples(st.integers(0, 2), _model_kwargs(), _layout_kwargs(),
                                 st.one_of(st.sampled_from([2048 * 8, 2048 * 64, 4096]), SIZES),
                                 st.sampled_from(["train", "prefill", "decode", "serve"])), _run_estimate),
    Target("collective_time_s", st.tuples(st.integers(0, 2), st.sampled_from(["all_reduce", "all_to_all", "p2p",
                                                                                "all_gather", "bogus"]),
                                          st.one_of(SIZES, st.lists(SIZES, max_size=3)),
                                          st.one_of(SIZES, st.lists(st.integers(-1, 20), max_size=4))),
           _run_collective),
    Target("search", st.tuples(st.integers(0, 2), st.fixed_dictionaries(
        {}, optional={"num_experts": SMALL_LISTS, "top_k": SMALL_LISTS, "moe_every": SMALL_LISTS,
                      "expert": SMALL_LISTS, "micro_batch_size": SMALL_LISTS}),
        st.sampled_from([2048, 8 * 2048, 64 * 2048, 0, 3, -1]),
        st.sampled_from(["quality_per_time", "step_time", "quality", "fastest"])), _run_search),
    Target("predict_loss", st.tuples(_model_kwargs(), st.one_of(st.sampled_from([1e9, 1e11, 3e12]), SIZES),
                                     st.one_of(st.none(), MOSTLY_PLAUSIBLE),
                                     st.one_of(st.just("train"), st.none(), SIZES)), _run_predict_loss),
    Target("CLI", st.lists(st.sampled_from(WORDS), min_size=1, max_size=7), _run_cli),
]
