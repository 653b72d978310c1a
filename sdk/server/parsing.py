"""A /v1/chat/completions body -> ChatRequest, or an ApiError saying what is wrong with it.

One image per conversation, in a user message, or several (frames, in order: sdk/frames.py), all in one user
message and at most the bundle's multi_image.n_max. One user turn: answered with Pipeline.stream (prompt = its
text). Several turns (system, earlier user and assistant messages): answered with the SDK's Conversation
(sdk/conversation.py), which renders the whole conversation with the bundle's chat template.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from ..frames import FrameCountError, Frames
from .config import ServerConfig
from .errors import ApiError, bad_request
from .images import from_url
from .regions import parse_regions

ROLES = {"system", "developer", "user", "assistant", "tool"}


@dataclass
class ChatRequest:
    prompt: str
    image: Image.Image | list[Image.Image]  # one image, or several frames in order (the SDK's image argument)
    options: dict = field(default_factory=dict)  # Pipeline.stream keyword arguments (region, referring included)
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    turns: list[dict] | None = None  # several turns: the conversation in the SDK's message form, else None


def optional(body: dict, name: str, kinds: tuple[type, ...], what: str):
    value = body.get(name)
    if value is not None and (isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds)):
        raise bad_request(f"{name} must be {what}, not {value!r}", name)
    return value


def parse_chat(body, config: ServerConfig, visual_tokens: int, frames: Frames | None = None) -> ChatRequest:
    """frames: the bundle's way of combining frames (Pipeline.frames), whose n_max bounds the images of a request;
    None: one image per request (explain)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_json")
    model = body.get("model")
    if model != config.served_model:
        raise ApiError(404, f"model {model!r} is not served here: use {config.served_model!r} (GET /v1/models)",
                       param="model", code="model_not_found")
    if body.get("n") not in (None, 1):
        raise bad_request("n must be 1: this server returns one choice per request", "n")
    budget = optional(body, "visual_tokens", (int,), "an integer")
    if budget is not None and budget != visual_tokens:
        raise bad_request(f"visual_tokens={budget} is not available: this bundle's visual-token budget is fixed "
                          f"at {visual_tokens} (export another budget with 'pipmm export --visual-tokens')",
                          "visual_tokens")
    prompt, image, turns = conversation(body.get("messages"), config, frames)
    max_tokens = optional(body, "max_completion_tokens", (int,), "an integer")
    if max_tokens is None:
        max_tokens = optional(body, "max_tokens", (int,), "an integer")
    options = {"max_new_tokens": max_tokens,
               "temperature": optional(body, "temperature", (int, float), "a number"),
               "top_p": optional(body, "top_p", (int, float), "a number"),
               "seed": optional(body, "seed", (int,), "an integer"),
               "inhibit": optional(body, "inhibit", (int, float), "a number in [0, 1)"),
               "min_new_tokens": optional(body, "min_tokens", (int,), "an integer")}
    stream = optional(body, "stream", (bool,), "true or false") or False
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    if turns is not None and options["inhibit"]:
        raise bad_request("inhibit applies to one-turn requests: a conversation is answered without CMAI", "inhibit")
    if isinstance(image, list) and body.get("regions") is not None:
        raise bad_request(f"a region refers to one image, but the messages hold {len(image)}: send one image with "
                          "regions", "regions", "invalid_region")
    options.update(parse_regions(body.get("regions"), image, config))
    return ChatRequest(prompt, image, options, stream, bool(stream_options.get("include_usage")),
                       stop_strings(body.get("stop"), config.max_stop_strings), turns)


def stop_strings(stop, limit: int) -> list[str]:
    stops = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
    if not isinstance(stops, list) or len(stops) > limit or not all(isinstance(s, str) and s for s in stops):
        raise bad_request(f"stop must be a non-empty string or a list of at most {limit} of them", "stop")
    return stops


def conversation(messages, config: ServerConfig, frames: Frames | None = None
                 ) -> tuple[str, Image.Image | list[Image.Image], list[dict] | None]:
    """-> (the last user text, the image or the frames in order, the conversation in the SDK's message form when
    it has more than one turn, else None)."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    prompt, urls, holders, turns = None, [], set(), []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise bad_request(f"each message needs a role of {sorted(ROLES)}", "messages")
        role = "system" if message["role"] == "developer" else message["role"]
        if role not in ("system", "user", "assistant"):
            continue  # tool messages: this server runs no tools
        text, found = content_parts(message.get("content"))
        if role == "user":
            prompt = text
            urls += found
            holders |= {len(turns)} if found else set()
        elif found:
            raise bad_request(f"an image belongs in a user message, not a {role} message", "messages")
        turns.append({"role": role, "content": ordered_parts(message.get("content"))})
    if prompt is None or turns[-1]["role"] != "user":
        raise bad_request("the last message must be the user's, with the question", "messages")
    if not urls:
        raise bad_request("no image in the messages: add a content part {\"type\": \"image_url\", \"image_url\": "
                          "{\"url\": \"data:image/png;base64,...\"}}", "messages", "image_required")
    check_count(len(urls), len(holders), frames)
    images = [from_url(url, config) for url in urls]  # in the order sent: frame after frame
    image = images[0] if len(images) == 1 else images
    if len(turns) == 1:
        return prompt, image, None
    decoded = iter(images)
    for turn in turns:  # the SDK's form: each decoded image in its place
        turn["content"] = [{"type": "image", "image": next(decoded)} if part["type"] == "image_url" else part
                           for part in turn["content"]]
    return prompt, image, turns


def check_count(count: int, messages: int, frames: Frames | None) -> None:
    """Several images are frames of one user message, at most the bundle's n_max (400 too_many_images)."""
    if messages > 1:
        raise bad_request(f"the images are in {messages} user messages: several images are frames of one request "
                          "and belong in one user message, in order", "messages", "too_many_images")
    if count > 1 and frames is None:
        raise bad_request(f"the messages hold {count} images: this endpoint takes one image", "messages",
                          "too_many_images")
    try:
        if frames is not None:
            frames.check(count)
    except FrameCountError as err:
        raise bad_request(str(err), "messages", "too_many_images") from None


def ordered_parts(content) -> list[dict]:
    """A message's content as the SDK's parts, in the order sent (templates render them in that order); image
    parts are placeholders here, replaced by the decoded image."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [{"type": "image_url"} if part["type"] == "image_url" else {"type": "text", "text": part["text"]}
            for part in content]  # content_parts has checked every part


def content_parts(content) -> tuple[str, list[str]]:
    """A user message's content (a string or a list of parts) -> (its text, its image URLs)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise bad_request("a user message's content must be a string or a list of content parts", "messages")
    texts, urls = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            image_url = part.get("image_url")
            urls.append(image_url.get("url") if isinstance(image_url, dict) else image_url)
        else:
            raise bad_request("content parts must be {\"type\": \"text\", \"text\": ...} or {\"type\": \"image_url\", "
                              "\"image_url\": {\"url\": ...}}", "messages")
    return "\n".join(texts), urls
