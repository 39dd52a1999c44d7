"""The Gemma IT conversation format: rendering, tokenisation and loss masks.

Gemma 3 report, Table 4: a conversation starts with the `<bos>` token (added as a token id,
never by tokenising a string), each turn is `<start_of_turn>user|model\\n...<end_of_turn>\\n`,
there is no system role (a system message is folded into the first user turn), and IT models
end their generation with `<end_of_turn>`. Loss is computed on model turns and their
`<end_of_turn>` only.

Control tokens are inserted as ids and message text is tokenised with special tokens split,
so text that merely *looks* like a control token ("<end_of_turn>" or "[BOS]" typed by a user)
can never become one. The Jinja template below renders the same ids for ordinary text and
carries `{% generation %}` markers so TRL's assistant-only loss works with it too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from rewards.reward_model import use_pair_encoder

BOS = "<bos>"
EOS = "<eos>"
PAD = "<pad>"
UNK = "<unk>"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
CONTROL_TOKENS = [PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN]

ROLES = ("system", "user", "assistant")
# Gemma names the assistant "model" inside the format.
_TURN_NAME = {"user": "user", "assistant": "model"}

# The template shipped with every tokenizer this project writes (and so with exported
# checkpoints). `{% generation %}` marks what TRL's `assistant_only_loss` trains on.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '<start_of_turn>user\n' + (first_user_prefix if loop.first else '') + message['content'] + '<end_of_turn>\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<start_of_turn>model\n' }}{% generation %}{{ message['content'] + '<end_of_turn>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ raise_exception('Gemma has roles user and assistant after an optional first system message; got ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# The same format for composite models (Gemma 3 4B and up), whose messages may hold content parts:
# a text part renders its text, an image part `<start_of_image>`, which the processor expands into
# the image's soft tokens, as Gemma 3's own template does. String contents render exactly as
# GEMMA_CHAT_TEMPLATE renders them.
START_OF_IMAGE = "<start_of_image>"
_RENDER_CONTENT = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{ '" + START_OF_IMAGE + "' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- else -%}{{ raise_exception('a content part has type ' + part['type'] + '; expected text or image') }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)
GEMMA_MULTIMODAL_CHAT_TEMPLATE = _RENDER_CONTENT + GEMMA_CHAT_TEMPLATE.replace(
    "messages[0]['content'] + '\n\n'", "render_content(messages[0]['content']) + '\n\n'").replace(
    "+ message['content'] + '<end_of_turn>\n'", "+ render_content(message['content']) + '<end_of_turn>\n'").replace(
    "{{ message['content'] + '<end_of_turn>' }}", "{{ render_content(message['content']) + '<end_of_turn>' }}")


def chat_template_for(composite: bool) -> str:
    """The chat template a tokenizer of this project ships: with image parts for composite models."""
    return GEMMA_MULTIMODAL_CHAT_TEMPLATE if composite else GEMMA_CHAT_TEMPLATE


# What a conversation given as one text without a prompt is told (the data's column mapping splits it).
TRANSCRIPT_HINT = ("a transcript kept as one text (\"\\n\\nHuman: ...\\n\\nAssistant: ...\", as in Anthropic/hh-rlhf) "
                   "is split into messages by the dataset's column mapping, e.g. columns: {chosen: {from: chosen, "
                   "turns: {\"\\n\\nHuman:\": user, \"\\n\\nAssistant:\": assistant}}, rejected: ...}")


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered in the Gemma IT format."""


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is trained on (model turns and their <end_of_turn>)


def as_messages(prompt: str | Sequence[dict], where: str = "prompt") -> list[dict]:
    """A prompt given as plain text becomes a single user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)):
        raise ChatFormatError(f"{where}: expected text or a list of {{role, content}} turns, got {_describe(prompt)}")
    return list(prompt)


def message_text(content: Any, where: str = "content") -> str:
    """The text of a message's `content`: a string, or a list of content parts, the shape
    transformers' chat templates and OpenAI-style datasets use
    (`[{"type": "text", "text": ...}, ...]`), whose text parts are joined as those templates
    render them (back to back). posttrain trains text-only models, so any other part (an
    image, audio) is refused rather than silently dropped from what the model sees."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)) and content:
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else None
                raise ChatFormatError(
                    f"{where}[{j}]: expected a text part {{'type': 'text', 'text': str}}, got "
                    + (f"a {kind!r} part; posttrain trains text-only models" if kind not in (None, "text")
                       else _describe(part)))
            texts.append(part["text"])
        return "".join(texts)
    raise ChatFormatError(f"{where}: expected a string or a list of text parts, got {_describe(content)}")


def _role_and_text(message: Any, where: str) -> tuple[str, str]:
    """One message's role (checked) and text (see message_text)."""
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        hint = ""
        if isinstance(message, dict) and "from" in message and "value" in message:
            hint = ("; ShareGPT's {from, value} messages are read through the dataset's column mapping, e.g. "
                    "columns: {messages: {from: conversations, roles: {human: user, gpt: assistant}}}")
        raise ChatFormatError(f"{where}: expected a mapping with 'role' and 'content', got {_describe(message)}{hint}")
    if message["role"] not in ROLES:
        raise ChatFormatError(f"{where}.role: expected one of {', '.join(ROLES)}, got {message['role']!r}")
    return message["role"], message_text(message["content"], f"{where}.content")


def is_blank(value: Any) -> bool:
    """No text at all: None, blank text, or messages whose contents are all blank. A value of the
    wrong shape is not "blank": the format checks then say what is wrong with it."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return False
    for message in value:
        if not isinstance(message, dict):
            return False
        content = message.get("content")
        if content is None:
            continue
        try:
            if message_text(content).strip():
                return False
        except ChatFormatError:
            return False
    return True


def normalise_messages(messages: Any, where: str = "messages") -> list[dict]:
    """Validate a conversation and fold a leading system message into the first user turn.

    Returns user/assistant turns only. Errors name the offending index (`where[i].role`).
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatFormatError(f"{where}: expected a non-empty list of {{role, content}} turns, got {_describe(messages)}")
    turns: list[dict] = []
    system: str | None = None
    for i, m in enumerate(messages):
        role, content = _role_and_text(m, f"{where}[{i}]")
        if role == "system":
            if i != 0:
                raise ChatFormatError(f"{where}[{i}].role: a system message may only come first")
            system = content
            continue
        turns.append({"role": role, "content": content})
    if not turns:
        raise ChatFormatError(f"{where}: the conversation has no user or assistant turn")
    if turns[0]["role"] != "user":
        raise ChatFormatError(f"{where}: the first non-system turn must be from the user, got {turns[0]['role']!r}")
    for a, b in zip(turns, turns[1:]):
        if a["role"] == b["role"]:
            raise ChatFormatError(f"{where}: turns must alternate user/assistant; two {a['role']!r} turns follow each other")
    if system is not None:
        turns[0] = {"role": "user", "content": system + "\n\n" + turns[0]["content"]}
    return turns


def render_text(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as a string (for display and for engines that take text)."""
    out = [BOS]
    for t in normalise_messages(messages):
        out.append(f"{START_OF_TURN}{_TURN_NAME[t['role']]}\n{t['content']}{END_OF_TURN}\n")
    if add_generation_prompt:
        out.append(f"{START_OF_TURN}model\n")
    return "".join(out)


def control_token_ids(tokenizer) -> dict[str, int]:
    """Ids of the Gemma control tokens; a clear error when the tokenizer lacks one."""
    ids = {}
    for tok in (BOS, EOS, PAD, START_OF_TURN, END_OF_TURN):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid is None or tid == tokenizer.unk_token_id and tok != UNK:
            raise ChatFormatError(f"tokenizer has no {tok} token; the Gemma IT format needs {', '.join(CONTROL_TOKENS)}")
        ids[tok] = tid
    return ids


def _encode_text(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not text:
        return [], []
    enc = tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    return list(enc["input_ids"]), list(enc["offset_mapping"])


def tokenize_conversation(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False,
                          where: str = "messages") -> TokenizedConversation:
    """Token ids and loss mask of a conversation in the Gemma IT format.

    Each turn's header and text are tokenised as one piece ("model\\n" + content), as the chat
    template does, and the mask starts at the first token that ends past the header.
    """
    ids = control_token_ids(tokenizer)
    input_ids = [ids[BOS]]
    mask = [0]
    for t in normalise_messages(messages, where):
        header = _TURN_NAME[t["role"]] + "\n"
        body_ids, offsets = _encode_text(tokenizer, header + t["content"])
        trained = t["role"] == "assistant"
        input_ids.append(ids[START_OF_TURN])
        mask.append(0)
        input_ids.extend(body_ids)
        mask.extend(int(trained and end > len(header)) for _, end in offsets)
        _close_turn(tokenizer, ids, input_ids, mask, trained)
    if add_generation_prompt:
        _open_model_turn(tokenizer, ids, input_ids, mask)
    return TokenizedConversation(input_ids, mask)


def has_gemma_control_tokens(tokenizer) -> bool:
    """Whether the tokenizer carries the Gemma IT format's control tokens (every tokenizer this
    project writes does; a third party's reward model of another family may not)."""
    try:
        control_token_ids(tokenizer)
    except ChatFormatError:
        return False
    return True


# Stands in for a message's text while the tokenizer's own chat template renders the structure.
_MESSAGE_MARKER = "\x00posttrain-message-{}\x00"
_MESSAGE_MARKER_RE = re.compile("\x00posttrain-message-(\\d+)\x00")


def tokenize_with_chat_template(tokenizer, messages: Sequence[dict], where: str = "messages") -> list[int]:
    """Token ids of a conversation in the tokenizer's own chat template (a reward model of another
    family, such as a Llama 3 one, scores text in the format it was trained on).

    The template renders the structure with a marker in place of each message's text; the
    template's pieces are tokenised with their special tokens and each message's text with
    special tokens split, so a completion that types "<|eot_id|>" stays text and cannot forge a
    turn, as in the Gemma format. (transformers' apply_chat_template tokenises the rendered
    string whole, which would make such text a control token.) Text is tokenised apart from the
    template's pieces, so ids at a boundary may split differently than a tokenisation of the
    whole string; the decoded text is the same.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ChatFormatError(f"the tokenizer has neither the Gemma control tokens ({', '.join(CONTROL_TOKENS)}) "
                              "nor a chat template, so a conversation cannot be rendered for it")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatFormatError(f"{where}: expected a non-empty list of {{role, content}} turns, got {_describe(messages)}")
    texts, structure = [], []
    for i, m in enumerate(messages):
        role, text = _role_and_text(m, f"{where}[{i}]")
        texts.append(text)
        structure.append({"role": role, "content": _MESSAGE_MARKER.format(i)})
    try:
        rendered = tokenizer.apply_chat_template(structure, tokenize=False)
    except Exception as e:  # a template's own refusal (raise_exception), e.g. roles it does not take
        raise ChatFormatError(f"{where}: the tokenizer's chat template refused the conversation: {e}") from None
    pieces = _MESSAGE_MARKER_RE.split(rendered)
    if [int(i) for i in pieces[1::2]] != list(range(len(messages))):
        raise ChatFormatError(f"{where}: the tokenizer's chat template drops, repeats or reorders message text, "
                              "so it cannot be rendered with the text kept apart from the structure")
    ids: list[int] = []
    for k, piece in enumerate(pieces):
        if k % 2:
            ids.extend(_encode_text(tokenizer, texts[int(piece)])[0])
        elif piece:
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return ids


def tokenize_prompt(tokenizer, prompt: str | Sequence[dict], where: str = "prompt") -> list[int]:
    """Prompt ids ending with the model-turn header, ready for generation."""
    messages = as_messages(prompt, where)
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        raise ChatFormatError(f"{where}: a generation prompt must end with a user turn")
    # A blank prompt is a data bug (an unmapped or empty column), not a question: sampling
    # answers to nothing would train on them without a word.
    if is_blank(prompt):
        raise ChatFormatError(f"{where}: empty; a generation prompt needs text to answer")
    return tokenize_conversation(tokenizer, messages, add_generation_prompt=True, where=where).input_ids


def prompt_completion_to_messages(prompt: str | Sequence[dict], completion: str | dict | Sequence[dict]) -> list[dict]:
    """A prompt and its completion (text, one message, or messages) as one conversation.

    Some public preference and SFT sets (HuggingFaceH4/ultrafeedback_binarized, for one) give
    `prompt` as text and `chosen`/`completion` as the whole conversation, the prompt's turn
    included. A completion whose first turn is not the assistant's is taken as that whole
    conversation when the prompt's turns are its opening turns; when they are not, the row is
    ambiguous and refused, rather than rendered with the prompt twice.
    """
    msgs = as_messages(prompt)
    if isinstance(completion, str):
        return msgs + [{"role": "assistant", "content": completion}]
    if isinstance(completion, dict):
        return msgs + [completion]
    if not isinstance(completion, (list, tuple)):
        raise ChatFormatError(f"completion: expected text, one message or a list of messages, got {_describe(completion)}")
    completion = list(completion)
    if completion and isinstance(completion[0], dict) and completion[0].get("role") in ("system", "user"):
        if len(completion) > len(msgs) and all(_same_turn(p, c) for p, c in zip(msgs, completion)):
            return completion
        raise ChatFormatError(
            f"completion: starts with a {completion[0].get('role')!r} turn, so it reads as the whole conversation, "
            f"but its opening turns are not the prompt's ({len(msgs)} turn(s)); give the completion as the "
            "assistant's turn(s) only, or the whole conversation starting with the prompt")
    return msgs + completion


def conversation_of(prompt: str | Sequence[dict] | None, completion: Any) -> list[dict]:
    """The whole conversation of a prompt and its completion; ``prompt`` None: the completion is
    that whole conversation already (a list of messages)."""
    if prompt is None:
        if not isinstance(completion, (list, tuple)):
            raise ChatFormatError(f"completion: without a prompt it must be the whole conversation (a list of "
                                  f"messages), got {_describe(completion)}"
                                  + (f"; {TRANSCRIPT_HINT}" if isinstance(completion, str) else ""))
        return list(completion)
    return prompt_completion_to_messages(prompt, completion)


def preference_conversations(prompt: str | Sequence[dict] | None, chosen: Any, rejected: Any) -> tuple[list[dict], list[dict]]:
    """The two whole conversations of a preference pair, checked to be two answers to one prompt.

    ``prompt`` None: ``chosen`` and ``rejected`` are whole conversations (the shape of
    trl-lib/ultrafeedback_binarized or a conversational Anthropic HH). Each side must end with the
    assistant's turn (a reward model scores an answer), and the two may differ only from an
    assistant turn on: a pair whose prompts differ (columns shifted against each other, a join
    gone wrong) compares answers to different questions, and Bradley-Terry would learn from it
    without complaint. Identical sides (a tie in the source data) are allowed.
    """
    sides = {}
    for side, completion in (("chosen", chosen), ("rejected", rejected)):
        try:
            messages = conversation_of(prompt, completion)
        except ChatFormatError as e:
            raise ChatFormatError(f"'{side}'{' (with the prompt)' if prompt is not None else ''}: {e}") from None
        for i, message in enumerate(messages):
            _role_and_text(message, f"{side}[{i}]")
        if not messages or messages[-1]["role"] != "assistant":
            last = messages[-1]["role"] if messages else "nothing"
            raise ChatFormatError(f"'{side}': the conversation ends with {last!r}, not with the assistant's answer "
                                  "that a reward model scores")
        if is_blank(messages[-1]):
            raise ChatFormatError(f"'{side}': the assistant's answer (turn {len(messages) - 1}) is empty; a "
                                  "preference pair needs two non-empty answers")
        sides[side] = messages
    chosen_msgs, rejected_msgs = sides["chosen"], sides["rejected"]
    for i, (a, b) in enumerate(zip(chosen_msgs, rejected_msgs)):
        if not _same_turn(a, b):
            if a["role"] != "assistant" or b["role"] != "assistant":
                raise ChatFormatError(
                    f"chosen[{i}] ({a['role']}) and rejected[{i}] ({b['role']}) differ before the answers do: a "
                    "preference pair is two answers to the same conversation, and these two answer different ones")
            break
    else:
        if len(chosen_msgs) != len(rejected_msgs):
            longer, shorter = ("chosen", "rejected") if len(chosen_msgs) > len(rejected_msgs) else ("rejected", "chosen")
            raise ChatFormatError(f"'{longer}' goes on where '{shorter}' ends (after turn {min(len(chosen_msgs), len(rejected_msgs)) - 1}): "
                                  "a preference pair is two answers to the same conversation")
    return chosen_msgs, rejected_msgs


def _same_turn(a: Any, b: Any) -> bool:
    """Same role and the same text, up to surrounding whitespace (a string and the same text
    given as content parts are the same turn)."""
    if not (isinstance(a, dict) and isinstance(b, dict) and a.get("role") == b.get("role")):
        return False
    try:
        return message_text(a.get("content")).strip() == message_text(b.get("content")).strip()
    except ChatFormatError:
        return False


def strip_end_of_turn(text: str) -> str:
    """A generated answer without its closing control token (and anything after it)."""
    return text.split(END_OF_TURN, 1)[0]


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def encode_pair(tokenizer, prompt: Any, completion: Any, max_length: int,
                gemma_format: bool | None = None) -> list[int]:
    """Token ids a reward model scores for (prompt, completion).

    In the Gemma IT format when the tokenizer has its control tokens, otherwise in the
    tokenizer's own chat template (a third party's reward model of another family scores the
    format it was trained on). Either way control tokens come from the structure only and
    message text stays text, so a completion that writes "<end_of_turn>" or "<|eot_id|>" cannot
    forge the turns the model scores. ``prompt`` None: ``completion`` is the whole conversation.
    Over-long pairs keep their first token (``<bos>``) and their end (the completion, where the
    score is read). Training (the ``reward_model`` stage) and scoring (``rewards.reward_model``,
    which is handed this function below) share it, so they see the same ids. ``gemma_format``:
    which of the two, when the caller has looked it up once for the tokenizer (None looks it up).
    """
    messages = conversation_of(prompt, completion)
    if gemma_format is None:
        gemma_format = has_gemma_control_tokens(tokenizer)
    if gemma_format:
        ids = tokenize_conversation(tokenizer, messages).input_ids
    else:
        ids = tokenize_with_chat_template(tokenizer, messages)
    if len(ids) > max_length:
        ids = ids[:1] + ids[len(ids) - max_length + 1:]
    return ids


def pair_encoder(tokenizer) -> Callable[[Any, Any, int], list[int]]:
    """`encode_pair` for one tokenizer, its format looked up once rather than per pair."""
    gemma_format = has_gemma_control_tokens(tokenizer)

    def encode(prompt: Any, completion: Any, max_length: int) -> list[int]:
        return encode_pair(tokenizer, prompt, completion, max_length, gemma_format)

    return encode


# rewards/ stands alone and knows no chat format; reward models trained here must be scored in
# the tokenisation they were trained on, so this module hands its encoder to the scorer.
use_pair_encoder(pair_encoder)


# --- image + text conversations (composite models with a processor) -------------------------------

def load_image(part: dict, where: str):
    """The PIL image of an image part: `{"type": "image", "path": ...}`, or `"image"` holding a PIL
    image or a local path. Remote URLs are refused: nothing is downloaded during a run."""
    from PIL import Image

    source = part.get("image", part.get("path", part.get("url")))
    if source is None:
        raise ChatFormatError(f"{where}: an image part needs 'path' (a local file) or 'image' (a PIL image or a path)")
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        raise ChatFormatError(f"{where}: {source!r} is a remote URL; images are read from local files "
                              "(download them beforehand and give their paths)")
    try:
        with Image.open(str(source).removeprefix("file://")) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as e:
        raise ChatFormatError(f"{where}: cannot read the image {source!r}: {e}") from None


def _turn_parts(content: Any, where: str) -> list:
    """A message's content as a list of text strings and image parts (dicts), in order."""
    if isinstance(content, str):
        return [content]
    if not isinstance(content, (list, tuple)) or not content:
        raise ChatFormatError(f"{where}: expected a string or a list of text and image parts, got {_describe(content)}")
    out = []
    for j, part in enumerate(content):
        kind = part.get("type", "text") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif kind == "image":
            out.append(part)
        else:
            raise ChatFormatError(f"{where}[{j}]: expected a text or an image part, got {_describe(part)}")
    return out


def image_parts(messages: Any) -> list[dict]:
    """The image parts of a conversation's turns, in order (none for text or a malformed value)."""
    if not isinstance(messages, (list, tuple)):
        return []
    return [p for m in messages if isinstance(m, dict) and isinstance(m.get("content"), (list, tuple))
            for p in m["content"] if isinstance(p, dict) and p.get("type") == "image"]


def has_image_parts(messages: Any) -> bool:
    """Whether any message of a conversation holds an image part."""
    return bool(image_parts(messages))


def text_view(messages: Sequence[dict], where: str = "messages") -> list[dict]:
    """The conversation with each image part replaced by empty text: what the text checks see."""
    return [{**m, "content": [{"type": "text", "text": p if isinstance(p, str) else ""}
                              for p in _turn_parts(m["content"], f"{where}[{i}].content")]}
            if isinstance(m, dict) and "content" in m else m for i, m in enumerate(messages)]


def _close_turn(tokenizer, ids: dict, input_ids: list[int], mask: list[int], trained: bool) -> None:
    """`<end_of_turn>` (trained with the turn: the model learns to stop) and the newline after it."""
    input_ids.append(ids[END_OF_TURN])
    mask.append(int(trained))
    nl, _ = _encode_text(tokenizer, "\n")
    input_ids.extend(nl)
    mask.extend([0] * len(nl))


def _open_model_turn(tokenizer, ids: dict, input_ids: list[int], mask: list[int]) -> None:
    """`<start_of_turn>model\n`: the generation prompt, never trained on."""
    head, _ = _encode_text(tokenizer, "model\n")
    input_ids.append(ids[START_OF_TURN])
    input_ids.extend(head)
    mask.extend([0] * (1 + len(head)))


def tokenize_image_conversation(processor, messages: Sequence[dict], add_generation_prompt: bool = False,
                                where: str = "messages") -> tuple[TokenizedConversation, list]:
    """Token ids, loss mask and images of a conversation with image parts, for a composite model.

    Text is tokenised as `tokenize_conversation` does; each image part becomes the processor's
    full image sequence (`\\n\\n<start_of_image>` + its soft tokens + `<end_of_image>\\n\\n` for
    Gemma 3), never trained on. Returns the images in order, for the processor's image processor.
    """
    tokenizer = processor.tokenizer
    normalise_messages(text_view(messages, where), where)  # roles, order, the system turn: as for text
    turns = []
    for i, m in enumerate(messages):
        parts = _turn_parts(m["content"], f"{where}[{i}].content")
        if m["role"] == "system":
            turns.append(("system", parts))
        elif turns and turns[-1][0] == "system":
            turns[-1] = (m["role"], turns[-1][1] + ["\n\n"] + parts)
        else:
            turns.append((m["role"], parts))
    ids = control_token_ids(tokenizer)
    image_ids = tokenizer(processor.full_image_sequence, add_special_tokens=False)["input_ids"]
    input_ids, mask, images = [ids[BOS]], [0], []
    for role, parts in turns:
        trained = role == "assistant"
        input_ids.append(ids[START_OF_TURN])
        mask.append(0)
        head, _ = _encode_text(tokenizer, _TURN_NAME[role] + "\n")
        input_ids.extend(head)
        mask.extend([0] * len(head))
        for j, part in enumerate(parts):
            if isinstance(part, str):
                body, _ = _encode_text(tokenizer, part)
                input_ids.extend(body)
                mask.extend([int(trained)] * len(body))
            else:
                images.append(load_image(part, f"{where}: turn {len(images)} image part {j}"))
                input_ids.extend(image_ids)
                mask.extend([0] * len(image_ids))
        _close_turn(tokenizer, ids, input_ids, mask, trained)
    if add_generation_prompt:
        _open_model_turn(tokenizer, ids, input_ids, mask)
    return TokenizedConversation(input_ids, mask), images


def image_model_inputs(processor, conversation: TokenizedConversation, images: list) -> dict:
    """Batch-of-one tensors for a composite model's forward or generate: input_ids, attention_mask,
    pixel_values and token_type_ids (1 on image soft tokens, which attend to each other both ways)."""
    import torch

    input_ids = torch.tensor([conversation.input_ids])
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
           "token_type_ids": (input_ids == processor.tokenizer.image_token_id).long()}
    if images:
        out["pixel_values"] = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return out
