"""Every ```python block of README.md and docs/**/*.md is executed, so the documentation cannot go stale.

Conventions (the documentation's contract, also stated in docs/source/contributing_docs.md):

* The blocks of one page run in order, in one namespace, in a fresh temporary working directory that holds two
  fixtures built once per test session: ``tiny-psld/`` (a saved ``PSLDPipeline``: the ``tiny`` UNet preset,
  3 data channels, 16 px, PSLD Γ = 0.01, ``prediction_type="epsilon"``) and ``tiny-ddpm/`` (a saved diffusers
  ``DDPMPipeline``: a tiny ``UNet2DModel``, 3 channels, 16 px, and ``DDPMScheduler()``).
* Hub ids written in snippets are mapped to those fixtures by patching the loaders the snippets call
  (``from_pretrained`` of diffusers' pipelines, models and schedulers, ``load_config``, and this package's
  ``from_pretrained`` / ``from_vp_pretrained``); the network is never used (``HF_HUB_OFFLINE=1``).
* A block preceded by the line ``<!-- snippet: skip (reason) -->`` is not run; its test is reported as skipped
  with that reason. ``bash`` and other blocks are not executed.

One test per block (``README.md::3`` is the page's third python block). Running a block runs the page's earlier
blocks first, once; when one of them fails, the later blocks of that page are skipped naming it.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
HUB_IDS = {"google/ddpm-cifar10-32": "tiny-ddpm", "your-name/psld-cifar10": "tiny-psld"}
FIXTURES = ("tiny-psld", "tiny-ddpm")
SKIP_RE = re.compile(r"^\s*<!--\s*snippet:\s*skip\s*\((?P<reason>.+)\)\s*-->\s*$")
FENCE_RE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")


@dataclass
class Block:
    page: str  # relative to the repository
    index: int  # 1-based among the page's python blocks
    line: int  # 1-based line of the opening fence
    code: str
    skip: Optional[str] = None


def extract_blocks(text: str, page: str) -> List[Block]:
    """The ```python blocks of a Markdown text, with the skip reason of the marker line right before them
    (only blank lines may separate the marker from the fence)."""
    lines = text.splitlines()
    blocks: List[Block] = []
    i, pending_skip = 0, None
    while i < len(lines):
        m = FENCE_RE.match(lines[i])
        skip = SKIP_RE.match(lines[i])
        if skip:
            pending_skip = skip.group("reason").strip()
            i += 1
            continue
        if not m:
            if lines[i].strip():
                pending_skip = None
            i += 1
            continue
        fence, indent, info = m.group("fence"), len(m.group("indent")), m.group("info").lower()
        start = i
        body = []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence[0] * len(fence))
                                      and set(lines[i].strip()) == {fence[0]}):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        if i >= len(lines):
            raise ValueError(f"{page}:{start + 1}: unterminated code fence")
        i += 1
        if info in ("python", "py", "python3"):
            blocks.append(Block(page, len(blocks) + 1, start + 1, textwrap.dedent("\n".join(body)) + "\n",
                                pending_skip))
        pending_skip = None
    return blocks


def documentation_pages() -> List[Path]:
    pages = [REPO / "README.md"]
    docs = REPO / "docs"
    if docs.is_dir():
        pages += sorted(p for p in docs.rglob("*.md") if "_build" not in p.parts)
    return pages


def all_blocks() -> List[Block]:
    out = []
    for path in documentation_pages():
        out += extract_blocks(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    return out


# ---------------------------------------------------------------------------------------------- fixtures
def build_fixtures(directory: Path) -> None:
    """``tiny-psld/`` and ``tiny-ddpm/`` (see the module docstring), random weights, seed 0."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from diffusers_psld import PSLDPipeline, PSLDScheduler, build_unet

    torch.manual_seed(0)
    scheduler = PSLDScheduler(gamma=0.01, nu=4.01, prediction_type="epsilon")
    unet = build_unet("tiny", 3, scheduler.num_components, sample_size=16)
    PSLDPipeline(unet=unet, scheduler=scheduler).save_pretrained(directory / "tiny-psld")
    ddpm_unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                            layers_per_block=1, norm_num_groups=8)
    DDPMPipeline(unet=ddpm_unet, scheduler=DDPMScheduler()).save_pretrained(directory / "tiny-ddpm")


@pytest.fixture(scope="session")
def fixture_dir():
    directory = Path(tempfile.mkdtemp(prefix="psld-doc-fixtures-"))
    build_fixtures(directory)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _map_id(value):
    return HUB_IDS.get(value, value) if isinstance(value, str) else value


def _mapping_classmethod(method):
    func = method.__func__

    @functools.wraps(func)
    def wrapper(cls, pretrained_model_name_or_path=None, *args, **kwargs):
        return func(cls, _map_id(pretrained_model_name_or_path), *args, **kwargs)

    return classmethod(wrapper)


@contextlib.contextmanager
def hub_ids_mapped():
    """Map the documented Hub ids to the local fixtures in every loader a snippet can call."""
    import diffusers
    from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin, SchedulerMixin

    import diffusers_psld
    import diffusers_psld.pipelines as psld_pipelines

    targets = [(DiffusionPipeline, "from_pretrained"), (ModelMixin, "from_pretrained"),
               (SchedulerMixin, "from_pretrained"), (ConfigMixin, "load_config")]
    for module in (diffusers_psld, psld_pipelines):
        for name in getattr(module, "__all__", []):
            cls = getattr(module, name, None)
            for meth in ("from_pretrained", "from_vp_pretrained", "load_config"):
                if isinstance(cls, type) and isinstance(cls.__dict__.get(meth), classmethod):
                    targets.append((cls, meth))
    with pytest.MonkeyPatch.context() as mp:
        for cls, meth in dict.fromkeys(targets):
            mp.setattr(cls, meth, _mapping_classmethod(cls.__dict__[meth]))
        assert diffusers  # the patched classes are diffusers' own: every pipeline class inherits the mapping
        yield


# ---------------------------------------------------------------------------------------------- runner
@dataclass
class PageState:
    cwd: Path
    namespace: Dict = field(default_factory=dict)
    done: int = 0  # number of blocks run (or skipped)
    failed: Optional[str] = None


_STATES: Dict[str, PageState] = {}
_BLOCKS = all_blocks()


def _run_block(block: Block, state: PageState) -> None:
    old = os.getcwd()
    os.chdir(state.cwd)
    try:
        with hub_ids_mapped(), torch.random.fork_rng():
            torch.manual_seed(0)
            code = compile(block.code, f"{block.page}:{block.line}", "exec")
            exec(code, state.namespace)  # noqa: S102  (the project's own documentation)
    finally:
        os.chdir(old)


def _state(page: str, fixture_dir: Path, tmp_root: Path) -> PageState:
    if page not in _STATES:
        cwd = tmp_root / re.sub(r"[^A-Za-z0-9_.-]", "_", page)
        cwd.mkdir(parents=True)
        for name in FIXTURES:
            shutil.copytree(fixture_dir / name, cwd / name)
        _STATES[page] = PageState(cwd, {"__name__": "__main__"})
    return _STATES[page]


@pytest.fixture(scope="session")
def page_root():
    root = Path(tempfile.mkdtemp(prefix="psld-doc-pages-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("block", _BLOCKS, ids=[f"{b.page}::{b.index}" for b in _BLOCKS])
def test_snippet(block: Block, fixture_dir, page_root):
    if block.skip:
        pytest.skip(f"{block.page}:{block.line}: {block.skip}")
    state = _state(block.page, fixture_dir, page_root)
    for earlier in [b for b in _BLOCKS if b.page == block.page and state.done < b.index < block.index]:
        if state.failed:
            break
        if not earlier.skip:
            try:
                _run_block(earlier, state)
            except Exception as err:  # noqa: BLE001
                state.failed = f"block {earlier.index} (line {earlier.line}) failed: {type(err).__name__}: {err}"
        state.done = earlier.index
    if state.failed:
        pytest.skip(f"{block.page}: an earlier block failed — {state.failed}")
    if state.done >= block.index:  # already run as a prerequisite of a later block
        return
    try:
        _run_block(block, state)
    except Exception as err:
        state.failed = f"block {block.index} (line {block.line}) failed: {type(err).__name__}: {err}"
        raise
    finally:
        state.done = block.index


# ---------------------------------------------------------------------------------------------- the runner itself
def test_extract_blocks_reads_fences_skips_and_indentation():
    text = textwrap.dedent("""\
        # Title
        ```python
        a = 1
        ```
        <!-- snippet: skip (needs a GPU) -->

        ```python
        b = 2
        ```
        ```bash
        echo no
        ```
        * item

          ```python
          if True:
              c = 3
          ```
        <!-- snippet: skip (stale marker) -->
        text in between cancels the marker
        ```python
        d = 4
        ```
        """)
    blocks = extract_blocks(text, "x.md")
    assert [b.code for b in blocks] == ["a = 1\n", "b = 2\n", "if True:\n    c = 3\n", "d = 4\n"]
    assert [b.skip for b in blocks] == [None, "needs a GPU", None, None]
    assert [b.line for b in blocks] == [2, 7, 15, 21]
    with pytest.raises(ValueError, match="unterminated"):
        extract_blocks("```python\nx = 1\n", "bad.md")


def test_hub_ids_are_mapped_to_the_fixtures_and_nothing_else(fixture_dir, tmp_path, monkeypatch):
    from diffusers import DDPMPipeline, UNet2DModel

    from diffusers_psld import PSLDPipeline

    for name in FIXTURES:
        shutil.copytree(fixture_dir / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    with hub_ids_mapped():
        pipe = PSLDPipeline.from_pretrained("your-name/psld-cifar10")
        assert pipe.unet.config.in_channels == 6 and pipe.unet.config.sample_size == 16
        assert pipe.scheduler.config.gamma == pytest.approx(0.01)
        ddpm = DDPMPipeline.from_pretrained("google/ddpm-cifar10-32")
        assert ddpm.unet.config.in_channels == 3
        assert UNet2DModel.from_pretrained("google/ddpm-cifar10-32", subfolder="unet").config.sample_size == 16
        with pytest.raises(Exception):  # any other id is not mapped, and offline it cannot be fetched
            PSLDPipeline.from_pretrained("someone-else/not-a-fixture")
    with pytest.raises(Exception):  # outside the context nothing is mapped
        PSLDPipeline.from_pretrained("your-name/psld-cifar10")


def test_every_documentation_page_is_found():
    pages = {str(p.relative_to(REPO)) for p in documentation_pages()}
    assert "README.md" in pages
    assert any(b.page == "README.md" for b in _BLOCKS), "the README has no python block to test"
