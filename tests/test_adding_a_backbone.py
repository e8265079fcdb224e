"""docs/adding_a_backbone.md: its code blocks run as written (the guide cannot rot)."""

import os
import re

from detectron2.modeling import BACKBONE_REGISTRY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_guides_code_runs_and_its_trunk_is_short():
    with open(os.path.join(ROOT, "docs", "adding_a_backbone.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) == 2
    # The promise of the page: a whole reversible trunk and its builder in at most ~80 lines.
    assert len(blocks[0].strip().splitlines()) <= 80
    namespace = {}
    try:
        for block in blocks:
            exec(compile(block, "docs/adding_a_backbone.md", "exec"), namespace)
        assert (
            BACKBONE_REGISTRY.get("build_tiny_rev_backbone") is namespace["build_tiny_rev_backbone"]
        )
    finally:
        BACKBONE_REGISTRY._obj_map.pop("build_tiny_rev_backbone", None)
