"""A fixed similarity embedder pinned to a hub commit loads that commit, and the row says so.

The hub is a local Hugging Face cache (offline) holding two commits of one small causal LM
repo, `refs/main` pointing at the newer: what a moving branch looks like after an upstream
push. The same repo serves as a base model, whose row must name the commit `main` meant.
The cache location is read by huggingface_hub at import, so the checks run in a fresh
interpreter with HF_HUB_CACHE and HF_HUB_OFFLINE set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow  # fresh interpreters that load models: ~10 s each on 2 cores
OLD, NEW = "a" * 40, "b" * 40
WIDTH = {OLD: 32, NEW: 48}  # so the embedding size says which commit was loaded


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlora_ray.builtin import ensure_builtin

    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--example-org--embedder"
    tok = AutoTokenizer.from_pretrained(ensure_builtin("builtin:tiny-llama"))
    for commit, width in WIDTH.items():
        snapshot = repo / "snapshots" / commit
        LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2)).save_pretrained(snapshot)
        tok.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(NEW)
    return cache


def offline(cache: Path, code: str) -> dict:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_pinned_embedder_loads_its_commit_not_the_moved_branch(hub_cache: Path) -> None:
    got = offline(hub_cache, f"""
import json
from qlora_ray.evaluate import Embedder
out = {{}}
for revision in ({OLD!r}, None):
    e = Embedder("example-org/embedder", "cpu", revision=revision)
    out[str(revision)] = [int(e(None, None, ["a headline"], 1).shape[1]), e.commit]
try:
    Embedder("example-org/embedder", "cpu", revision={"c" * 40!r})(None, None, ["x"], 1)
    out["unknown"] = "loaded"
except OSError as err:
    out["unknown"] = type(err).__name__
print(json.dumps(out))
""")
    assert got[OLD] == [WIDTH[OLD], OLD]
    assert got["None"] == [WIDTH[NEW], NEW]  # unpinned: whatever main points at now
    assert got["unknown"] == "OSError"


def test_the_row_records_the_embedder_and_model_commits(hub_cache: Path) -> None:
    got = offline(hub_cache, f"""
import json
from qlora_ray.config import ExperimentConfig, from_dict
from qlora_ray.worker import run_experiment
cfg = from_dict(ExperimentConfig, {{
    "model": "example-org/embedder",
    "dataset": {{"path": "experiments/data/fin_sentiment.jsonl", "eval_size": 4}},
    "quant": {{"compute_dtype": "float32"}},
    "train": {{"max_steps": 1, "batch_size": 2, "optim": "adamw_torch", "gradient_checkpointing": False}},
    "eval": {{"max_new_tokens": 2, "similarity": {{"embedder": "example-org/embedder", "revision": {OLD!r}}}}},
}})
row = run_experiment(cfg, num_threads=1).row
print(json.dumps({{k: row[k] for k in ("status", "error", "embedder", "embedder_revision", "model_revision")}}))
""")
    assert got["status"] == "ok", got["error"]
    assert (got["embedder"], got["embedder_revision"]) == ("example-org/embedder", OLD)
    assert got["model_revision"] == NEW  # the commit `main` pointed at when the weights loaded
