"""The README is generated where it quotes other sources (node schemas, benchmark results): it fails here when they drift apart."""

from __future__ import annotations

import re

from tests.helpers import ROOT
from tools.node_reference import ORDER, render, section_in


def test_node_reference_matches_the_node_schemas(comfy):
    object_info = comfy.get_json("/object_info")
    readme = (ROOT / "README.md").read_text()
    assert section_in(readme) == render(object_info), "run: .build/venv/bin/python tools/node_reference.py"
    for node in ORDER:  # every node, every input of it, is there
        info = object_info[node]
        assert f"### {info['display_name']} (`{node}`)" in readme
        for group in ("required", "optional"):
            for name in info["input"].get(group, {}):
                assert re.search(rf"^\| `{re.escape(name)}`", section_in(readme).split(f"(`{node}`)")[1], re.M)


def test_a_new_input_changes_the_reference():
    info = {"OmniTeaCache": {"category": "Omni Accel", "display_name": "TeaCache", "description": "d",
                             "input": {"required": {"rel_l1_thresh": ["FLOAT", {"default": 0.2, "min": 0, "max": 10}]}},
                             "input_order": {"required": ["rel_l1_thresh"]},
                             "output": ["OMNI_PIPE"], "output_name": ["pipe"]}}
    before = render(info)
    info["OmniTeaCache"]["input"]["optional"] = {"new_knob": ["INT", {"default": 3, "min": 0, "max": 9, "tooltip": "t"}]}
    info["OmniTeaCache"]["input_order"]["optional"] = ["new_knob"]
    after = render(info)
    assert before != after and "| `new_knob` (optional) | INT | 3 | 0 .. 9 | t |" in after


def test_readme_benchmark_summary_is_what_the_committed_results_say():
    """The README quotes only committed results: its summary block is bench/report.summary of results.json."""
    import json

    from bench.report import SUMMARY_END, SUMMARY_START, summary

    results = json.loads((ROOT / "bench" / "results" / "results.json").read_text())
    readme = (ROOT / "README.md").read_text()
    block = readme.split(SUMMARY_START, 1)[1].split(SUMMARY_END, 1)[0].strip("\n")
    assert block == "\n".join(summary(results)).strip("\n"), "run: .build/venv/bin/python bench/run.py (or re-render the summary)"
    assert (ROOT / "bench" / "results" / "summary.md").read_text().strip("\n") == block


def test_readme_native_head_to_head_is_what_the_committed_results_say():
    """The native head-to-head the README quotes is bench/native.readme_summary of its committed results.json."""
    import json

    from bench.native import NATIVE_END, NATIVE_START, readme_summary

    results = json.loads((ROOT / "bench" / "results" / "native" / "results.json").read_text())
    readme = (ROOT / "README.md").read_text()
    block = readme.split(NATIVE_START, 1)[1].split(NATIVE_END, 1)[0].strip("\n")
    assert block == "\n".join(readme_summary(results)).strip("\n"), "run: .build/venv/bin/python bench/native.py --render"
