"""``wsss plots``: ``dvc plots show`` that renders offline.

DVC's default page loads Vega, Vega-Lite and vega-embed from a CDN, so with no network (this machine,
most clusters) every declared plot but the PNGs silently vanishes. Here the page is DVC's own, built from an
HTML template that carries the three libraries inline (``vl_convert.javascript_bundle()``, the versions
vl-convert-python ships), written once beside DVC's other temporary files.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from wsss.lib.errors import WsssError
from wsss.lib.io import atomic_file

TEMPLATE = Path(".dvc") / "tmp" / "plots_offline.html"
PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>wsss plots (DVC)</title>
<script>{bundle}</script>
<style>table {{ border-spacing: 15px; }} body {{ font-family: sans-serif; }}</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


def offline_template(path: Path = TEMPLATE) -> Path:
    """Writes (once) a DVC HTML template with Vega, Vega-Lite and vega-embed inline; returns its path."""
    import vl_convert

    if not path.is_file():
        with atomic_file(path, "w") as handle:
            # DVC fills only {plot_divs} here; its {scripts} (the CDN tags) are left out on purpose.
            handle.write(PAGE.format(bundle=vl_convert.javascript_bundle()))
    return path


def show(out: str | Path = "dvc_plots") -> Path:
    """``dvc plots show -o out`` with the offline template; returns the page (``out/index.html``).

    Raises:
        WsssError: DVC failed (its last error line is quoted).
    """
    cmd = [sys.executable, "-m", "dvc", "plots", "show", "--html-template", str(offline_template()), "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        raise WsssError(f"dvc plots show failed: {lines[-1] if lines else f'exit {result.returncode}'}")
    return Path(out) / "index.html"
