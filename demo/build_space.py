"""Write a self-contained Hugging Face Space folder for the demo: it installs without this repository.

    python demo/build_space.py --output_dir space                      # builds the wheel with `python -m build`
    python demo/build_space.py --output_dir space --wheel dist/diffusers_psld-0.1.0-py3-none-any.whl

The folder holds ``app.py``, the Space ``README.md`` (its header configures the Space), the package
``diffusers_psld/`` unpacked from the wheel (exactly what ``pip install`` of that wheel puts into
site-packages, model-card templates included) and a ``requirements.txt`` with the wheel's own dependencies plus
the demo's (``demo/requirements.txt`` without its ``diffusers-psld`` line). Carrying the package as files, not as
a wheel named in ``requirements.txt``, works however the Space builder orders copying the folder and installing
the requirements. Once ``diffusers-psld`` is released, ``demo/requirements.txt`` as it is (it names the release)
and ``app.py`` + ``README.md`` are all a Space needs.
"""
from __future__ import annotations

import argparse
import email.parser
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEMO = Path(__file__).resolve().parent
REPO = DEMO.parent
PACKAGE = "diffusers_psld"


def build_wheel(out_dir: Path) -> Path:
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out_dir), str(REPO)], check=True)
    wheels = sorted(out_dir.glob(f"{PACKAGE}-*.whl"))
    if not wheels:
        raise SystemExit(f"error: `python -m build` wrote no {PACKAGE} wheel into {out_dir}")
    return wheels[-1]


def wheel_requirements(wheel: zipfile.ZipFile) -> list[str]:
    """The wheel's ``Requires-Dist`` entries that apply without extras."""
    meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    message = email.parser.Parser().parsestr(wheel.read(meta).decode("utf-8"))
    return [r for r in message.get_all("Requires-Dist", []) if "extra ==" not in r]


def demo_requirements() -> list[str]:
    out = []
    for line in (DEMO / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not re.match(r"^diffusers[-_]psld\b", line, re.IGNORECASE):
            out.append(line)
    return out


def build_space(output_dir: Path, wheel_path: Path) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    if (output_dir / PACKAGE).exists():
        shutil.rmtree(output_dir / PACKAGE)
    for name in ("app.py", "README.md"):
        shutil.copy2(DEMO / name, output_dir / name)
    with zipfile.ZipFile(wheel_path) as wheel:
        for member in wheel.namelist():
            if member.startswith(PACKAGE + "/"):
                wheel.extract(member, output_dir)
        requirements = wheel_requirements(wheel)
    lines = ["# written by demo/build_space.py from " + wheel_path.name + ": the package's own dependencies and the",
             "# demo's; the package itself is the diffusers_psld/ folder next to this file",
             *dict.fromkeys(requirements + demo_requirements())]
    (output_dir / "requirements.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return output_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="the Space folder to write")
    parser.add_argument("--wheel", default=None, help="a built diffusers_psld wheel (default: build one now)")
    args = parser.parse_args(argv)
    if args.wheel:
        matches = glob.glob(args.wheel)
        if len(matches) != 1 or not os.path.isfile(matches[0]):
            parser.error(f"--wheel: expected one wheel file, got {matches or args.wheel!r}")
        wheel = Path(matches[0])
        build_space(Path(args.output_dir), wheel)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            build_space(Path(args.output_dir), build_wheel(Path(tmp)))
    print(f"Space folder written to {args.output_dir}: upload its contents to a Gradio Space "
          "(set PSLD_MODEL to a Hub id of a PSLD pipeline)")


if __name__ == "__main__":
    main()
