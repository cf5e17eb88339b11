"""The README's quickstart runs exactly as written."""

import math
import pathlib
import re


def test_readme_quickstart_runs(capsys):
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python block"
    namespace: dict = {}
    exec(compile(blocks[0], "README quickstart", "exec"), namespace)
    log_Z, mean = (float(v) for v in capsys.readouterr().out.split())
    assert abs(log_Z - (-0.5 * math.log(21) - 64 / 42)) < 0.1
    assert abs(mean - 160 / 21) < 0.2
