"""Checked rows -> token ids + loss masks, through the tokenizer's own chat template.

Where assistant turns are (robust to any template): for assistant message i,
    start = len(ids(messages[:i], add_generation_prompt=True))   # after "<|im_start|>assistant\\n"
    end   = len(ids(messages[:i+1]))                              # after "...<|im_end|>\\n"
and both renders must be token prefixes of the whole conversation's render (a template that rewrites
history - e.g. one that drops earlier reasoning - breaks that and is reported, never guessed around).
The span [start, end) loses its trailing template glue (whitespace tokens after the end-of-turn
token, e.g. the "\\n" after <|im_end|>): the model must learn to emit <|im_end|>, not the newline.
If the turn does not end in a special token (a template without end-of-turn markers), EOS is inserted
after it so the model learns to stop; a template that already emits EOS gets no second one.

mask[i] True = token i is a loss target (predicted from tokens[:i]); mask[0] is always False.
Tokenizers without a chat template: {"text"} rows -> text + EOS, prompt/completion -> prompt then
completion + EOS (tokenized separately, as at inference); message lists need a template.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from forge_core.data.rows import PreferenceExample, RowProblem, SftExample, UnpairedExample
from forge_core.errors import ForgeError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(model_dir):
    """transformers AutoTokenizer from a local HF dir (or a .gguf file); never downloads, no remote code."""
    path = Path(model_dir)
    if not path.exists():
        raise ForgeError(f"{path}: model directory not found")
    kwargs = {"local_files_only": True, "trust_remote_code": False}
    if path.is_file() and path.suffix == ".gguf":
        kwargs["gguf_file"], path = path.name, path.parent
    elif not path.is_dir() or not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ForgeError(f"{path}: no tokenizer here (expected one of {', '.join(TOKENIZER_FILES)}); "
                         "point at an HF model directory")
    from transformers import AutoTokenizer  # lazy: slow import, not needed by `forge --help`

    try:
        return AutoTokenizer.from_pretrained(str(path), **kwargs)
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad model directory for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ForgeError(f"{model_dir}: cannot load the tokenizer ({type(e).__name__}: {first[:200]})") from None


def pad_token_id(tokenizer) -> int:
    """The id to pad with: pad, else EOS (padding is never scored, so any id works), else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


class ChatTokenizer:
    """Turns SftExample / PreferenceExample into int32 ids and bool masks with one tokenizer."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.eos_id = tokenizer.eos_token_id
        self.special = {int(i) for i in tokenizer.all_special_ids}
        self.special.update(int(i) for i, t in _added_tokens(tokenizer).items() if getattr(t, "special", False))
        self._space: dict[int, bool] = {}

    # ------------------------------------------------------------ rendering

    def render(self, messages: list[dict], generation_prompt: bool, tools: list[dict] | None = None) -> list[int]:
        try:
            ids = self.tok.apply_chat_template(messages, tools=tools, tokenize=True,
                                               add_generation_prompt=generation_prompt, return_dict=False)
        except Exception as e:  # noqa: BLE001 - templates raise anything (jinja errors, raise_exception)
            raise RowProblem(f"the chat template rejected this conversation ({type(e).__name__}: "
                             f"{str(e)[:160]})") from None
        if ids and isinstance(ids[0], list):  # some versions return a batch of one
            ids = ids[0]
        return [int(i) for i in ids]

    def _prefix(self, full: list[int], messages: list[dict], generation_prompt: bool,
                tools: list[dict] | None = None) -> int:
        """Length of the render of `messages`, after checking it is a token prefix of `full`."""
        ids = self.render(messages, generation_prompt, tools)
        if full[:len(ids)] != ids:
            what = " + generation prompt" if generation_prompt else ""
            raise RowProblem(f"chat template is not prefix-stable: the first {len(messages)} message(s){what} "
                             "do not render as a prefix of the whole conversation, so assistant turns cannot "
                             "be located (the template rewrites earlier turns)")
        return len(ids)

    def _is_glue(self, tid: int) -> bool:
        """A non-special token that decodes to whitespace only (template glue like the '\\n' after <|im_end|>)."""
        if tid not in self._space:
            text = self.tok.decode([tid])
            self._space[tid] = tid not in self.special and bool(text) and not text.strip()
        return self._space[tid]

    def _turn_end(self, ids: list[int], start: int, end: int) -> tuple[int, bool]:
        """(end of the turn without trailing glue, whether it ends in an end-of-turn special token)."""
        while end > start and self._is_glue(ids[end - 1]):
            end -= 1
        return end, end > start and ids[end - 1] in self.special

    def _closed(self, ids: list[int], has_eot: bool) -> list[int]:
        """Append EOS to a turn that does not end in an end-of-turn token."""
        return ids if has_eot or self.eos_id is None else ids + [int(self.eos_id)]

    # ------------------------------------------------------------ SFT

    def sft(self, ex: SftExample, train_on_prompt: bool) -> tuple[np.ndarray, np.ndarray]:
        if ex.text is not None:
            return self.text(ex.text)
        if not self.has_template:
            if ex.prompt is None or ex.messages[0]["role"] == "system":
                raise RowProblem("the tokenizer has no chat template: use 'text' or 'prompt'/'completion' rows "
                                 "without a system message, or a model with a chat template")
            return self.plain(ex.prompt, ex.completion, train_on_prompt)
        return self.chat(ex.messages, train_on_prompt, ex.tools)

    def chat(self, messages: list[dict], train_on_prompt: bool,
             tools: list[dict] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """ids and loss mask of a conversation: every assistant turn (its tool calls too) trained, the rest - system,
        user, tool results, the template's headers - not (unless train_on_prompt)."""
        full = self.render(messages, False, tools)
        tokens: list[int] = []
        mask: list[bool] = []
        cursor = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            if i == 0:  # transformers refuses to render the empty conversation before it
                raise RowProblem("the conversation starts with an assistant turn; put a user message first")
            start = self._prefix(full, messages[:i], True, tools)
            end = self._prefix(full, messages[:i + 1], False, tools)
            if not cursor <= start <= end:  # renders must grow with the conversation
                raise RowProblem(f"chat template renders message {i} (assistant) inconsistently: its generation "
                                 "prompt does not lie between the previous turn and this one")
            core_end, has_eot = self._turn_end(full, start, end)
            target = self._closed(full[start:core_end], has_eot)
            tokens += full[cursor:start] + target
            mask += [train_on_prompt] * (start - cursor) + [True] * len(target)
            cursor = core_end
        tokens += full[cursor:]
        mask += [train_on_prompt] * (len(full) - cursor)
        return _arrays(tokens, mask)

    def _encode(self, text: str, special: bool) -> list[int]:
        """Plain tokenization; special=True adds what the tokenizer adds around a text (e.g. BOS)."""
        return [int(i) for i in self.tok.encode(text, add_special_tokens=special)]

    def text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        ids = self._encode(text, True)
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids.append(int(self.eos_id))
        return _arrays(ids, [True] * len(ids))

    def plain(self, prompt: str, completion: str, train_on_prompt: bool) -> tuple[np.ndarray, np.ndarray]:
        p = self._encode(prompt, True)
        c = self._closed(self._encode(completion, False), False)
        return _arrays(p + c, [train_on_prompt] * len(p) + [True] * len(c))

    # ------------------------------------------------------------ preferences

    def preference(self, ex: PreferenceExample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prompt incl. the assistant header, chosen incl. end-of-turn, rejected incl. end-of-turn)."""
        return self.answers(ex.prompt, ex.system, (ex.chosen, ex.rejected))

    def unpaired(self, ex: UnpairedExample) -> tuple[np.ndarray, np.ndarray]:
        """(prompt incl. the assistant header, completion incl. end-of-turn)."""
        return self.answers(ex.prompt, ex.system, (ex.completion,))

    def answers(self, prompt_in, system: str, answers) -> tuple[np.ndarray, ...]:
        """(prompt ids, then each answer's ids as the assistant turn after that prompt)."""
        if not self.has_template:
            if isinstance(prompt_in, list) or system:
                raise RowProblem("the tokenizer has no chat template: use a string prompt without a system "
                                 "message, or a model with a chat template")
            done = (_ids(self._closed(self._encode(s, False), False)) for s in answers)
            return (_ids(self._encode(prompt_in, True)), *done)
        msgs = prompt_in if isinstance(prompt_in, list) else [{"role": "user", "content": prompt_in}]
        if system and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": system}] + msgs
        prompt = self.render(msgs, True)
        out = [_ids(prompt)]
        for answer in answers:
            full = self.render(msgs + [{"role": "assistant", "content": answer}], False)
            if full[:len(prompt)] != prompt:
                raise RowProblem("chat template is not prefix-stable: the prompt with the generation prompt does "
                                 "not render as a prefix of prompt + answer")
            core_end, has_eot = self._turn_end(full, len(prompt), len(full))
            out.append(_ids(self._closed(full[len(prompt):core_end], has_eot)))
        return tuple(out)


def _added_tokens(tokenizer) -> dict:
    try:
        return dict(tokenizer.added_tokens_decoder)
    except (AttributeError, TypeError):
        return {}


def _ids(ids: list[int]) -> np.ndarray:
    return np.asarray(ids, dtype=np.int32)


def _arrays(tokens: list[int], mask: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(mask, dtype=bool)
    if len(m):
        m[0] = False  # token 0 has no context to be predicted from
    return _ids(tokens), m


# ---------------------------------------------------------------- truncation


def truncate_sft(tokens: np.ndarray, mask: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Keep the first max_len tokens; raise RowProblem when no loss target is left."""
    cut = len(tokens) > max_len
    tokens, mask = tokens[:max_len], mask[:max_len]
    if not mask.any():
        if cut:
            raise RowProblem(f"no trainable tokens after truncation to max_seq_len={max_len}; "
                             "raise train.max_seq_len or shorten the row")
        raise RowProblem(f"no trainable tokens ({len(tokens)} token(s), none a loss target: an empty row?)")
    return tokens, mask, cut


def truncate_preference(prompt: np.ndarray, chosen: np.ndarray, rejected: np.ndarray, max_len: int):
    """Fit prompt + the longer completion into max_len.

    The prompt is cut from the LEFT first (its end - the question and the assistant header - matters most),
    down to max(max_len - longest completion, min(len(prompt), max_len // 2)); whatever is still too long is
    cut from the right of the completions. Returns (prompt, chosen, rejected, truncated?).
    """
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_len:
        return prompt, chosen, rejected, False
    keep = max(max_len - longest, min(len(prompt), max_len // 2))
    prompt = prompt[len(prompt) - keep:]
    room = max_len - len(prompt)
    chosen, rejected = chosen[:room], rejected[:room]
    if len(prompt) == 0 or len(chosen) == 0 or len(rejected) == 0:
        raise RowProblem(f"no trainable tokens after truncation to max_seq_len={max_len}; raise train.max_seq_len")
    return prompt, chosen, rejected, True
