"""python -m benchmarks.gpu_check --cpu-smoke: every section of the GPU check runs on the CPU,
tiny, so the check cannot rot between GPU loans. One subprocess, about a minute."""

import json
import math

from conftest import run_script, script_env

SECTIONS = ("correctness", "step", "harness", "concurrent", "stack", "determinism")


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_cpu_smoke_runs_every_section(tmp_path):
    env = script_env(JAX_PLATFORMS="cpu")
    env.pop("MINIGPT_TEST_GPU", None)
    r = run_script("benchmarks.gpu_check", "--cpu-smoke", "--out", tmp_path, env=env, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "cpu-smoke" and list(report["sections"]) == list(SECTIONS)
    s = {name: e["figures"] for name, e in report["sections"].items() if e["status"] == "ok"}
    assert list(s) == list(SECTIONS), {n: e.get("error") for n, e in report["sections"].items()}

    assert all(t["rc"] == 0 for t in s["correctness"]["pytest"])
    assert s["correctness"]["pytest"][1]["passed"] >= 1  # the parity test ran
    assert s["correctness"]["tf32_vs_fp32_max_rel"] == 0  # the CPU has no TF32

    rows = {(x["config"], x["contender"]): x for x in s["step"]["rows"]}
    for key in [("baseline", "jax"), ("baseline", "jax_fused"), ("baseline", "torch"),
                ("baseline:dtype=bfloat16", "jax")]:
        assert positive(rows[key]["step_ms"]) and positive(rows[key]["tokens_s"]), key
    assert positive(rows[("baseline", "jax")]["x_torch_eager"])
    assert [h["chunk_rows"] for h in s["step"]["head_chunks"]] == [32, 64]
    assert s["step"]["head_chunk_best"] in (32, 64)
    assert [e["eval_rows"] for e in s["step"]["eval_rows"]] == [1, 2]  # batch_size 2: the whole
    assert all(e["batch_ms"] > 0 for e in s["step"]["eval_rows"])

    h = s["harness"]
    assert h["steps"] == 20 and all(positive(h[k]) for k in
                                    ("wall_s", "harness_ms_per_step", "bare_ms_per_step"))
    assert 0 < h["harness_share_wall"] < 1

    c = s["concurrent"]
    assert [x["concurrent"] for x in c["rows"]] == [1, 2]
    assert all(positive(x["wall_s"]) for x in c["rows"]) and positive(c["speedup"])
    assert c["same_final_losses"]

    assert [x["n"] for x in s["stack"]["rows"]] == [2]
    assert all(positive(s["stack"]["rows"][0][k]) for k in ("stacked_s", "separate_s", "ratio"))

    d = s["determinism"]
    assert [x["flags"] for x in d["rows"]] == ["default", "deterministic_ops"]
    for x in d["rows"]:
        assert x["repeat"]["identical"] and x["resume"]["identical"], x
        assert x["repeat"]["steps"] == x["resume"]["steps"] == 12
        assert positive(x["ms_per_step"])
    assert positive(d["deterministic_ops_cost"])

    md = (tmp_path / "gpu_check.md").read_text()
    assert md.startswith("<!-- bench:begin gpu-check -->")
    for name in SECTIONS:
        assert f"#### {name}\n" in md
