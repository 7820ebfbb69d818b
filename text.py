"""Text in, text out: the checkpoint's tokenizer, chat template and generation config inside an
artifact, and their use at run time.

Export copies the files (`copy_text_files`) and describes them in the manifest's `text` section; they
are then listed and hashed like every other file. At run time `TextCodec` loads them with transformers'
own tokenizer classes, offline, from the artifact: `encode` is `tokenizer(text)`, `encode_chat` is
`apply_chat_template(messages, add_generation_prompt=True)`, decoding streams (`TextStream`: an incomplete UTF-8 sequence is held back until its last byte
arrives). EOS ids come
from generation_config.json (several for Jamba-1.5), else config.json.

transformers and tokenizers are imported lazily; missing, they are named (`pip install 'jambatrt[text]'`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from jambatrt.errors import ArtifactError, BackendUnavailable, CheckpointError, InputError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# everything transformers reads to rebuild a tokenizer and its generation defaults
TEXT_FILES = TOKENIZER_FILES + ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                                "chat_template.jinja", "chat_template.json", "generation_config.json")
MAX_CHAT_FILE_BYTES = 64 << 20
ROLES_HINT = 'a JSON list of {"role": "system"|"user"|"assistant", "content": "..."} objects'


# ---- export: copy and describe ---------------------------------------------------------------
def _json_file(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from None


def eos_ids(generation: dict | None, config: dict) -> list[int]:
    """EOS ids: the generation config's (one id or a list), else config.json's."""
    for source in (generation or {}, config):
        v = source.get("eos_token_id")
        if v is not None:
            ids = v if isinstance(v, list) else [v]
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise CheckpointError(f"eos_token_id={v!r} (accepted: a token id or a list of them)")
            return list(ids)
    return []


def copy_text_files(checkpoint: str | Path, out: str | Path, config: dict) -> dict:
    """Copy the checkpoint's tokenizer and generation files into `out`; -> the manifest's `text`
    section. A checkpoint without a tokenizer is fine (the section says so); a tokenizer that names
    ids beyond the model's vocabulary is refused (they would index past the embedding)."""
    checkpoint, out = Path(checkpoint), Path(out)
    files = [f for f in TEXT_FILES if (checkpoint / f).is_file()]
    for f in files:
        if f.endswith(".json"):
            _json_file(checkpoint / f)
        shutil.copyfile(checkpoint / f, out / f)
    generation = _json_file(out / "generation_config.json") if "generation_config.json" in files else None
    tokenizer = any(f in files for f in TOKENIZER_FILES)
    chat = False
    if "tokenizer_config.json" in files:
        chat = bool(_json_file(out / "tokenizer_config.json").get("chat_template"))
    chat = chat or "chat_template.jinja" in files or "chat_template.json" in files
    section = {"files": files, "tokenizer": tokenizer, "chat_template": chat,
               "eos_token_ids": eos_ids(generation, config)}
    if "tokenizer.json" in files:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            return section
        try:
            n = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
        except Exception as e:  # noqa: BLE001 - the Rust parser's errors: the file is not a tokenizer
            raise CheckpointError(f"{checkpoint / 'tokenizer.json'}: not a tokenizer ({e})") from None
        if n > config["vocab_size"]:
            raise CheckpointError(f"{checkpoint / 'tokenizer.json'} has {n:,} tokens, the model's vocabulary "
                                  f"{config['vocab_size']:,} (is it this checkpoint's tokenizer?)")
        section["vocab_size"] = n
    return section


# ---- run time ----------------------------------------------------------------------------------
def no_tokenizer_message(artifact) -> str:
    return (f"{artifact} has no tokenizer (its checkpoint had no tokenizer.json or tokenizer.model): "
            "text options need one; give token ids (--prompt-ids) instead")


def check_text(text, what: str = "prompt") -> str:
    """A non-empty str that is valid UTF-8 (a lone surrogate -- what undecodable bytes of argv become
    in Python -- is not)."""
    if not isinstance(text, str):
        raise InputError(f"{what} is a {type(text).__name__}; expected text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{what} is not valid UTF-8 (byte {e.start}: {e.reason})") from None
    if not text.strip():
        raise InputError(f"empty {what}: give some text")
    return text


def check_messages(messages, where: str = "messages") -> list[dict]:
    """A chat: a non-empty list of {role, content} objects with string values."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: not a list of messages (expected {ROLES_HINT})")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InputError(f"{where}: message {i} is {json.dumps(m)[:80]} (expected {ROLES_HINT})")
        check_text(m["content"], f"{where}: message {i} content")
    return messages


def read_messages(path: str | Path) -> list[dict]:
    """A JSON messages file (UTF-8)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CHAT_FILE_BYTES:
            raise InputError(f"{path}: {path.stat().st_size:,} bytes (a chat file is at most {MAX_CHAT_FILE_BYTES:,})")
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        messages = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except ValueError as e:
        raise InputError(f"{path}: not JSON ({e}); expected {ROLES_HINT}") from None
    return check_messages(messages, str(path))


class TextCodec:
    """The artifact's tokenizer through transformers (AutoTokenizer, offline, from the artifact's own
    files), its chat template and its EOS ids."""

    def __init__(self, artifact: str | Path, text: dict):
        """text: the manifest's `text` section (`Manifest.text`)."""
        self.artifact = Path(artifact)
        if not text.get("tokenizer"):
            raise ArtifactError(no_tokenizer_message(self.artifact))
        self.has_chat_template = bool(text.get("chat_template"))
        self.eos_token_ids = list(text.get("eos_token_ids") or [])
        os.environ.setdefault("HF_HUB_OFFLINE", "1")       # nothing is downloaded: the files are here
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise BackendUnavailable("text in/out needs transformers and tokenizers: pip install 'jambatrt[text]'") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.artifact), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - whatever transformers raises for files it cannot use
            raise ArtifactError(f"{self.artifact}: its tokenizer cannot be loaded ({type(e).__name__}: {e})") from None

    def encode(self, text: str) -> list[int]:
        """tokenizer(text).input_ids: special tokens (BOS) as the tokenizer adds them."""
        ids = list(self.tokenizer(check_text(text))["input_ids"])
        if not ids:
            raise InputError("empty prompt: the text encodes to no tokens")
        return ids

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """apply_chat_template(messages, add_generation_prompt=True), token ids."""
        check_messages(messages)
        if not self.has_chat_template:
            raise ArtifactError(f"{self.artifact}: its tokenizer has no chat template (tokenizer_config.json "
                                "chat_template); use a plain prompt")
        try:
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # noqa: BLE001 - the template's own raise_exception, jinja errors
            raise InputError(f"the chat template refused these messages: {e}") from None
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return [int(i) for i in ids]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def stream(self) -> "TextStream":
        return TextStream(self)

    def byte_token_ids(self) -> frozenset:
        """Ids of byte-fallback tokens (<0x00> .. <0xFF>), if the tokenizer has them."""
        if not hasattr(self, "_byte_ids"):
            self._byte_ids = frozenset(i for t, i in self.tokenizer.get_vocab().items()
                                       if len(t) == 6 and t.startswith("<0x") and t.endswith(">"))
        return self._byte_ids


class TextStream:
    """Decoded text of generated ids as they come: `step(id)` -> the text it adds (may be ""), and
    `finish()` -> what was held back; joined, they are exactly `decode(all ids)`.

    Each step decodes all ids so far with the tokenizer's own decode and hands out what extends the
    text already handed out. Held back: text ending in U+FFFD (a character's UTF-8 bytes arrive one
    token at a time; transformers' TextStreamer holds back the same way), and anything while the last
    token is a byte-fallback token (<0xNN>): the decoder turns a run of byte tokens into text as a
    whole -- every byte of a run that is not valid UTF-8 becomes U+FFFD, including bytes that looked
    like characters on their own -- so a run is only final once a non-byte token ends it.
    tokenizers' DecodeStream is not used: it raises on such runs, which a sampled model can emit."""

    def __init__(self, codec: TextCodec):
        self._decode = codec.decode
        self._byte_ids = codec.byte_token_ids()
        self._ids: list[int] = []
        self.text = ""                 # handed out so far

    def step(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        if token_id in self._byte_ids:
            return ""
        full = self._decode(self._ids)
        if full.endswith("\ufffd") or not full.startswith(self.text):
            return ""
        piece, self.text = full[len(self.text):], full
        return piece

    def finish(self) -> str:
        full = self._decode(self._ids)
        piece = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += piece
        return piece
