"""Pipeline stages (issue 19): the stage plan (export/stage_plan.py), the stage split of the step graph
(graph/passes/split_stages.py) and the stage engines (engines/staged.py) against the unsplit engine."""


import numpy as np
import onnx
import pytest

from conftest import compare_steps, private_artifact
from jambatrt.artifact import read_manifest
from jambatrt.config import preset
from jambatrt.errors import ArtifactError, ConfigError
from jambatrt.export.plan import memory_plan
from jambatrt.export.stage_plan import DEVICE_RESERVE, parse_bytes, plan_stages

GB = 10 ** 9


# ---- the plan (arithmetic only) -------------------------------------------------------------------
def test_parse_bytes():
    assert parse_bytes("80GB") == parse_bytes("80 G") == 80 * GB
    assert parse_bytes("80GiB") == 80 * 2 ** 30 and parse_bytes("1024") == 1024 and parse_bytes("1.5TB") == 1.5e12
    for bad in ("", "80 GBs", "-1GB", "0GB", "eighty"):
        with pytest.raises(ConfigError, match="accepted"):
            parse_bytes(bad)


def test_large_on_80gb_gpus_is_an_8_stage_plan_that_fits():
    cfg = preset("jamba-1.5-large")
    p = plan_stages(cfg, gpu_bytes=80 * GB)
    assert p["stages"] == 8 and p["fits"] and p["context"] == 262144
    assert [r for r in p["ranges"]][0][0] == 0 and p["ranges"][-1][1] == 72
    assert all(p["ranges"][i][1] == p["ranges"][i + 1][0] for i in range(7))
    for s in p["per_stage"]:
        assert s["total"] == s["weights"] + s["kv"] + s["mamba_state"] + s["activations"]
        assert s["total"] + DEVICE_RESERVE <= 80 * GB
    # the per-layer sums agree with memory_plan's closed form (weights, KV, Mamba state at 256K)
    whole = memory_plan(cfg)
    assert sum(s["weights"] for s in p["per_stage"]) == whole["weight_bytes"]["experts_int8"]
    assert sum(s["kv"] for s in p["per_stage"]) == whole["kv_bytes_at_context"]
    assert sum(s["mamba_state"] for s in p["per_stage"]) == whole["state_bytes_at_batch"]
    assert p["per_stage"][0]["also"] == ["embedding"] and p["per_stage"][-1]["also"] == ["norm + lm_head"]
    # one stage fewer does not fit: the plan is the fewest
    assert not plan_stages(cfg, stages=7, gpu_bytes=80 * GB)["fits"]


def test_mini_fits_one_gpu_and_bad_plans_are_refused():
    p = plan_stages(preset("jamba-1.5-mini"), gpu_bytes=80 * GB)
    assert p["stages"] == 1 and p["fits"] and p["ranges"] == [[0, 32]]
    with pytest.raises(ConfigError, match="even one layer per stage"):
        plan_stages(preset("jamba-1.5-large"), gpu_bytes=8 * GB)
    with pytest.raises(ConfigError, match="accepted: 1 .. 4"):
        plan_stages(preset("tiny"), stages=5)
    with pytest.raises(ConfigError, match="--gpu-memory"):
        plan_stages(preset("tiny"))
    # a fixed stage count balances: the largest stage is the smallest possible
    p2 = plan_stages(preset("jamba-1.5-large"), stages=2)
    assert p2["ranges"][0][1] in range(34, 39) and p2["fits"] is None


def _cli(capsys, *args):
    """`jambatrt ARGS` in this process (a child would spend its time importing torch) -> (code, out, err)."""
    from jambatrt import cli
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_prints_the_stage_plan(capsys):
    code, out, _ = _cli(capsys, "inspect", "--preset", "jamba-1.5-large", "--gpu-memory", "80GB")
    assert code == 0 and "pipeline stages: 8" in out and "every stage fits" in out
    lines = [x for x in out.splitlines() if x.strip().startswith("stage ")]
    assert len(lines) == 8 and all("fits 80 GB" in x and "KV" in x and "Mamba state" in x and "activations" in x
                                   for x in lines)
    code, out, _ = _cli(capsys, "inspect", "--preset", "jamba-1.5-mini", "--gpu-memory", "80GB")
    assert code == 0 and "pipeline stages: 1" in out
    code, _, err = _cli(capsys, "inspect", "--preset", "tiny", "--gpu-memory", "80 parsecs")
    assert code == 2 and "error: ConfigError" in err and "Traceback" not in err


# ---- the split and the stage engines --------------------------------------------------------------
@pytest.fixture(scope="module")
def artifact(tiny_artifact, tmp_path_factory):
    return private_artifact(tiny_artifact, tmp_path_factory, "stages-art")


@pytest.fixture(scope="module")
def whole(artifact):
    from jambatrt.engines.ort import OrtEngine
    with OrtEngine.load(artifact) as e:
        yield e


def _close(got, want, what):
    """Same kernels on the same inputs: equal up to 1e-6 of the tensor's magnitude (in fact bit-equal)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, what
    bound = 1e-6 * max(1.0, float(np.abs(want).max(initial=0)))
    assert float(np.abs(got - want).max(initial=0)) <= bound, what


@pytest.mark.parametrize("n", [2, 3])
def test_stages_equal_the_unsplit_engine(artifact, whole, n):
    from jambatrt.engines.staged import KEY, StagedEngine, build_stages
    entry = build_stages(artifact, stages=n)
    assert len(entry["stages"]) == n and read_manifest(artifact)["engines"][KEY]["plan"]["ranges"] == entry["plan"]["ranges"]
    L = 4
    for k, s in enumerate(entry["stages"]):
        g = onnx.load(str(artifact / s["path"]), load_external_data=False).graph
        a, b = s["layers"]
        assert [i.name for i in g.input] == [x["name"] for x in s["inputs"]]
        assert g.input[0].name == ("input_ids" if k == 0 else "hidden_in")
        assert g.output[0].name == ("logits" if b == L else "hidden_out")
        layers = {int(i.name.split(".")[1][5:]) for i in g.input[1:]}
        assert layers == set(range(a, b))
        # a stage holds only its own layers' weights (plus embedding / head at the ends)
        weights = {t.name for t in g.initializer if t.name.startswith("model.model.layers.")}
        assert {int(w.split(".")[3]) for w in weights} <= set(range(a, b))
    with StagedEngine.load(artifact) as st:            # prefill, chunked prefill (state carried), decode
        compare_steps(st, whole, _close, seed=n)


def test_cli_build_stages_and_generate(artifact, capsys):
    import json
    code, out, _ = _cli(capsys, "build", artifact, "--backend", "ort", "--stages", "2")
    assert code == 0 and "built 2 ort stage engines" in out and "stage 1: layers 2-3" in out
    gen = ["generate", artifact, "--backend", "ort", "--prompt-ids", "1,2,3", "--max-new-tokens", "8", "--json"]
    code, want, _ = _cli(capsys, *gen)
    code2, got, _ = _cli(capsys, *gen, "--stages")
    assert code == code2 == 0 and json.loads(got)["generated_ids"] == json.loads(want)["generated_ids"]
    code, _, err = _cli(capsys, "build", artifact, "--backend", "ort", "--stage-plan", "auto")
    assert code == 2 and "--gpu-memory" in err
    code, _, err = _cli(capsys, "build", artifact, "--backend", "tensorrt", "--stages", "2")
    assert code == 2 and "TensorRT stages" in err                     # ort and aoti stage engines only
    code, out, _ = _cli(capsys, "build", artifact, "--backend", "ort", "--stage-plan", "auto", "--gpu-memory", "80GB")
    assert code == 0 and "built 1 ort stage engines" in out            # tiny fits one device
    m = read_manifest(artifact)
    assert [s["path"] for s in m["engines"]["ort-stages"]["stages"]] == ["model.stage0.ort.onnx"]
    assert not (artifact / "model.stage1.ort.onnx").exists() and "model.stage1.ort.onnx" not in m["files"]


def test_split_refuses_a_graph_it_cannot_cut(artifact):
    """A second tensor crossing the cut (here: layer 2 reading layer 0's output too) is named, not guessed."""
    from jambatrt.graph.passes.split_stages import split_stages
    model = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    # the first Add of layer 2 (its residual): make it also read a float tensor produced in layer 0
    layer0 = next(n for n in g.node if "layers.0." in next((p.value for p in n.metadata_props if p.key == "namespace"), "")
                  and n.op_type == "MatMul")
    add = next(n for n in g.node if n.op_type == "Add" and "layers.2" in next(
        (p.value for p in n.metadata_props if p.key == "namespace"), "") and n.input[0] in prod)
    extra = onnx.helper.make_node("Add", [add.output[0], layer0.output[0]], ["bad_sum"], name="bad")
    extra.metadata_props.add(key="namespace", value=": x/model.model.layers.2: y")
    add_users = [n for n in g.node if add.output[0] in n.input]
    idx = list(g.node).index(add) + 1
    g.node.insert(idx, extra)
    for u in add_users:
        for j, i in enumerate(u.input):
            if i == add.output[0]:
                u.input[j] = "bad_sum"
    with pytest.raises(ArtifactError, match="tensors cross the cut"):
        split_stages(model, [(0, 1), (1, 4)], 4, 64)
    with pytest.raises(ArtifactError, match="contiguously"):
        split_stages(model, [(0, 2), (3, 4)], 4, 64)
