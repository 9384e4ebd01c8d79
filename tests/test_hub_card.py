"""Model card rendering (valid Hub metadata) and the Hub upload path with a recording stub."""
from huggingface_hub import ModelCard

from diffusers_psld import hub


def _fields(**kw):
    f = dict(diffusion="psld", dataset="sklearn-digits", resolution=16, channels=1, gamma=0.01, nu=4.01,
             model_preset="digits", steps=10, tags=["class-conditional"])
    f.update(kw)
    return f


def test_card_parses_with_valid_metadata(tmp_path):
    path = hub.write_model_card(tmp_path, _fields())
    card = ModelCard.load(path)
    d = card.data.to_dict()
    assert d["library_name"] == "diffusers"
    assert d["pipeline_tag"] == "unconditional-image-generation"
    assert d["license"] == "mit"
    assert {"diffusers", "psld", "class-conditional"} <= set(d["tags"])
    assert d["datasets"] == ["sklearn-digits"]
    assert "PSLDPipeline.from_pretrained" in card.text and "| Γ (gamma) | 0.01 |" in card.text
    cld = ModelCard(hub.render_model_card(_fields(diffusion="cld", dataset="user/my:data")))
    assert cld.data.to_dict()["datasets"] == ["user/my:data"] and "cld" in cld.data.to_dict()["tags"]


class RecordingApi:
    calls = []

    def __init__(self, token=None):
        RecordingApi.calls.append(("init", token))

    def create_repo(self, **kw):
        RecordingApi.calls.append(("create_repo", kw))
        return type("Url", (), {"repo_id": "me/" + kw["repo_id"].split("/")[-1]})()

    def upload_folder(self, **kw):
        RecordingApi.calls.append(("upload_folder", kw))


def test_push_folder_uses_stub_and_ignores_checkpoints(tmp_path, monkeypatch, capsys):
    RecordingApi.calls = []
    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    (tmp_path / "checkpoint-5").mkdir()
    rid = hub.push_folder(tmp_path, "psld-test", token="hf_secret_123", private=True)
    assert rid == "me/psld-test"
    kinds = [c[0] for c in RecordingApi.calls]
    assert kinds == ["init", "create_repo", "upload_folder"]
    assert RecordingApi.calls[1][1]["exist_ok"] is True and RecordingApi.calls[1][1]["private"] is True
    up = RecordingApi.calls[2][1]
    assert up["repo_id"] == "me/psld-test" and up["folder_path"] == str(tmp_path)
    assert "checkpoint-*" in up["ignore_patterns"]
    out = capsys.readouterr()
    assert "hf_secret_123" not in out.out + out.err
    assert hub.redact({"hub_token": "hf_x", "a": 1}) == {"hub_token": "***", "a": 1}


def test_uploads_keep_the_generic_loader_file():
    """push_folder's ignore patterns must not drop ``pipeline_psld.py`` (the generic loader needs it on the Hub)."""
    import fnmatch

    from diffusers_psld.hub import UPLOAD_IGNORE

    for name in ("pipeline_psld.py", "model_index.json", "unet/diffusion_pytorch_model.safetensors"):
        assert not any(fnmatch.fnmatch(name, pat) for pat in UPLOAD_IGNORE), name
    assert any(fnmatch.fnmatch("checkpoint-2/optimizer.bin", pat) for pat in UPLOAD_IGNORE)


def test_no_token_fails_before_any_hub_call(tmp_path, monkeypatch):
    import pytest

    RecordingApi.calls = []
    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(hub.HubError, match=r"^no Hub token: pass one"):
        hub.push_folder(tmp_path, "psld-test")
    with pytest.raises(hub.HubError, match=r"^no Hub token"):
        hub.create_repo("psld-test")
    assert RecordingApi.calls == []
    with pytest.raises(ValueError, match="hub_model_id"):
        hub.create_repo("a/b/c", token="hf_x")


def test_push_command_quotes_paths():
    cmd = hub.push_command("out dir/run", "me/psld")
    assert cmd.startswith("hf upload me/psld 'out dir/run' . --exclude 'checkpoint-*'"), cmd
