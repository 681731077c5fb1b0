"""Chat templates: how `POST /v1/chat/completions` turns `messages` into one prompt.

Grok-1 is a base model with no chat format of its own, so the server writes the conversation out
as plain text from a template file (`run.py serve --chat-template FILE`; the default is
`grok/serving/chat_templates/plain.json`) and the model continues it. A template file is a JSON object:

    {
      "description": "any text; ignored",
      "prefix": "",
      "system": "System: {content}\\n",
      "user": "User: {content}\\n",
      "assistant": "Assistant: {content}\\n",
      "generation_prompt": "Assistant:",
      "stop": ["\\nUser:"]
    }

- `system`, `user`, `assistant` (required): each message of that role is written with this Python
  `str.format` string, whose one placeholder is `{content}`: the message's text (a list of text
  parts is joined with "\\n"). Literal braces are written `{{` and `}}`.
- `generation_prompt` (required): literal text after the last message, where the model's turn
  begins. It is always added (also after an assistant message).
- `prefix` (optional, default ""): literal text before the first message.
- `stop` (optional, default none): a string or up to 4 strings added to every chat request's own
  `stop`. Generation ends before the first one, which is not returned: with "\\nUser:" the base
  model stops where it would start writing the user's next turn itself.
- `description` (optional): a note for the reader. Any other key is an error.

So the default renders `[system "Be brief.", user "Hi"]` as "System: Be brief.\\nUser: Hi\\nAssistant:",
and the reply is what the model writes after "Assistant:" (usually with a leading space) up to
the next "\\nUser:". Every error in a file is one line that starts with the file's name.
"""

from __future__ import annotations

import dataclasses
import json
import string
from pathlib import Path
from typing import Any, Iterable

ROLES = ("system", "user", "assistant")
DEFAULT_TEMPLATE = Path(__file__).resolve().parent / "chat_templates" / "plain.json"
# The template a preset's model was trained for, where it has one (a base model like Grok-1 has not).
PRESET_TEMPLATES = {"grok-2": Path(__file__).resolve().parent / "chat_templates" / "grok2.json"}
MAX_TEMPLATE_STOP = 4
MAX_TEMPLATE_BYTES = 1 << 20
_TEXT_KEYS = ("generation_prompt", "prefix", "description")
_KEYS = (*ROLES, *_TEXT_KEYS, "stop")


class ChatTemplateError(ValueError):
    """A template file that cannot be used; the message is one line naming the file."""


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A loaded, checked template (see the module docstring for the file format)."""

    system: str
    user: str
    assistant: str
    generation_prompt: str
    prefix: str = ""
    stop: tuple[str, ...] = ()
    source: str = "<template>"  # where it came from, for messages

    @classmethod
    def load(cls, path: str | Path | None = None) -> ChatTemplate:
        """The template in a file (None: the default). Raises `ChatTemplateError`."""
        path = DEFAULT_TEMPLATE if path is None else Path(path)
        try:
            if path.stat().st_size > MAX_TEMPLATE_BYTES:
                raise ChatTemplateError(f"{path}: a chat template file holds at most {MAX_TEMPLATE_BYTES} bytes")
            text = path.read_bytes().decode("utf-8")
        except OSError as err:
            raise ChatTemplateError(f"{path}: cannot read the chat template: {err.strerror or err}") from None
        except UnicodeDecodeError as err:
            raise ChatTemplateError(f"{path}: the chat template is not UTF-8 (byte {err.start})") from None
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as err:
            raise ChatTemplateError(f"{path}: the chat template is not valid JSON: {err}") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<template>") -> ChatTemplate:
        """A template from a file's parsed JSON object. Raises `ChatTemplateError`."""

        def fail(message: str) -> ChatTemplateError:
            return ChatTemplateError(f"{source}: {message}")

        if not isinstance(data, dict):
            raise fail(f"a chat template is a JSON object with the keys {', '.join(ROLES)} and generation_prompt")
        for key in data:
            if key not in _KEYS:
                raise fail(f"unknown key {key!r} (a chat template has {', '.join(_KEYS)})")
        for key in (*ROLES, "generation_prompt"):
            if key not in data:
                raise fail(f"missing key {key!r}")
        for key in (*ROLES, *_TEXT_KEYS):
            if key in data and not isinstance(data[key], str):
                raise fail(f"{key!r} must be a string, got {type(data[key]).__name__}")
            if key in data and not _encodable(data[key]):
                raise fail(f"{key!r} holds a lone surrogate, which is not a character")
        for role in ROLES:
            _check_format(data[role], role, fail)
        stop = data.get("stop", [])
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s and _encodable(s) for s in stop):
            raise fail("'stop' must be a non-empty string or a list of them")
        if len(stop) > MAX_TEMPLATE_STOP:
            raise fail(f"'stop' holds {len(stop)} strings; at most {MAX_TEMPLATE_STOP} are allowed")
        return cls(
            system=data["system"], user=data["user"], assistant=data["assistant"],
            generation_prompt=data["generation_prompt"], prefix=data.get("prefix", ""),
            stop=tuple(dict.fromkeys(stop)), source=source,
        )

    def render(self, messages: Iterable[tuple[str, str]]) -> str:
        """The prompt for (role, text) messages: prefix, each message, then the generation prompt."""
        parts = [self.prefix]
        for role, text in messages:
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
            parts.append(getattr(self, role).format(content=text))
        parts.append(self.generation_prompt)
        return "".join(parts)


def _check_format(template: str, role: str, fail) -> None:
    """A role's template: `str.format` syntax with `{content}` as its only placeholder."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as err:
        raise fail(f"{role!r} is not a valid format string ({err}); write literal braces as {{{{ and }}}}") from None
    for name, spec, conversion in fields:
        if name != "content" or spec or conversion:
            field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise fail(f"{role!r} has the placeholder {field}; the only one allowed is {{content}} "
                       "(write literal braces as {{ and }})")
    if not fields:
        raise fail(f"{role!r} has no {{content}} placeholder, so its messages would be dropped")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
