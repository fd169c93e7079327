"""Loading causal LMs and turning prompts and completions into token ids."""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator

import torch

from pref.errors import PrefError
from pref.examples import Prompt
from pref.hub import FROM_CACHE, cache_only
from pref.interfaces import Adapter

DEFAULT_MODEL = "pref-default"
#: The file that marks a folder as an adapter in PEFT's format (an adapter run's `final/`).
ADAPTER_CONFIG = "adapter_config.json"
#: The one-score head a causal LM gets as a sequence classifier (a reward model's): new until trained.
SCORE_HEAD = "score"


#: Whether the models, tokenizers and configs a command loads may run the Python code they ship (their config's `auto_map`):
#: `--trust-remote-code`, set for the whole command by `remote_code`, so the models plugins load follow it too; off by default.
REMOTE_CODE: ContextVar[bool] = ContextVar("pref_remote_code", default=False)
REMOTE_CODE_ERROR = "contains custom code which must be executed"  # how transformers refuses a model that ships code


@contextmanager
def remote_code(allowed: bool) -> Iterator[None]:
    """Inside, every model, tokenizer and config pref loads may run the code it ships when `allowed` (`--trust-remote-code`)."""
    token = REMOTE_CODE.set(allowed)
    try:
        yield
    finally:
        REMOTE_CODE.reset(token)


def quiet_transformers() -> None:
    """No per-file progress bars from transformers: pref shows its own progress. No notice from bitsandbytes, imported by
    transformers and peft where installed, that on a CPU with AVX512-BF16 its packed 4-bit kernel's faster variant is not
    installed: pref's 4-bit layers never take that kernel (`one_path_without_grad`)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def resolve_model_path(name: str | None) -> str:
    """A hub id or local path; None or `pref-default` means the embedded default model."""
    if name in (None, "", DEFAULT_MODEL):
        from pref.plugins.default_model import default_model_path

        quiet_transformers()
        return default_model_path()
    return os.path.expanduser(name)


def load_tokenizer(name: str | None, chat_template: str | None = None) -> Any:
    """The tokenizer of model `name`, with a pad token; `chat_template` (`--chat-template`) replaces its chat template."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    local = cache_only(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local, trust_remote_code=REMOTE_CODE.get())
    except (OSError, ValueError) as exc:
        raise _load_error(name, path, exc, local) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        tokenizer.chat_template = read_chat_template(chat_template)  # a Jinja mistake in it fails at the first prompt, before the model loads
    return tokenizer


def read_chat_template(source: str) -> str:
    """The chat template `--chat-template` names (TRL's `chat_template_path`): a Jinja file's text, or the chat template of
    a tokenizer (a model folder or hub id; a base model takes an instruct model's). Its special tokens are the
    trained model's own only if its tokenizer has them: others are written as plain text (several tokens each)."""
    path = os.path.expanduser(source)
    if path.endswith((".jinja", ".j2")) and not os.path.isfile(path):
        raise PrefError(f"--chat-template: no such file {source}")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            raise PrefError(f"--chat-template {source} is not UTF-8 text: give a Jinja chat template file") from None
        if not text.strip():
            raise PrefError(f"--chat-template {source} is empty: give a Jinja chat template file, or a model whose tokenizer has one")
        return text
    try:
        template = getattr(load_tokenizer(source), "chat_template", None)
    except PrefError as exc:
        raise PrefError(f"--chat-template {source} is no file, and no model whose tokenizer could be read: {exc}") from None
    if not isinstance(template, str) or not template:  # none, or several by name (a dict): which to take is the user's to say
        raise PrefError(f"--chat-template {source}: its tokenizer has {'several chat templates' if template else 'no chat template'}; "
                        "give a Jinja file of the one to use")
    return template


def load_model(name: str | None, dtype: torch.dtype | None = None, kind: str = "causal-lm", attention: str | None = None,
               quantize: str | None = None, device: Any = None) -> torch.nn.Module:
    """A causal LM, or with `kind="sequence-classifier"` the same backbone with a one-score head.

    `name` may also be a folder holding an adapter in PEFT's format (an adapter run's `final/`,
    any peft adapter type); its base model is loaded with the adapter on it. `dtype` None means float32.
    `attention`: transformers' attention implementation (`sdpa`, `eager`, `flash_attention_2`, ...); None: its default.
    `quantize` ("nf4", "fp4"): the linear layers of the decoder loaded in 4 bits by bitsandbytes onto `device`,
    computing in `dtype` (the embeddings, norms and head stay in `dtype`).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    quiet_transformers()
    path, dtype = resolve_model_path(name), dtype or torch.float32
    classifier, adapter = kind == "sequence-classifier", os.path.isfile(os.path.join(path, ADAPTER_CONFIG))
    local = cache_only((adapter and adapter_base(path)) or path)  # an adapter's base model may be a hub id
    options = {**(FROM_CACHE if local else {}), **({"attn_implementation": attention} if attention else {}),  # from_pretrained's
               "trust_remote_code": REMOTE_CODE.get()}
    if quantize:
        from transformers import BitsAndBytesConfig

        options["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_compute_dtype=dtype)
        device = torch.device(device or "cpu")
        if device.type == "cuda" and device.index is None:  # one process's "cuda": the current GPU, named
            device = torch.device("cuda", torch.cuda.current_device())
        options["device_map"] = {"": str(device)}  # quantized as it is loaded, where it will compute
    try:
        if adapter:
            import peft

            from pref.plugins.default_model import base_built_again

            auto = peft.AutoPeftModelForSequenceClassification if classifier else peft.AutoPeftModelForCausalLM
            base, labels = base_built_again(path), {"num_labels": 1} if classifier else {}
            with quiet_peft(), heads_from_adapter(path):  # a classifier's base gets the one-score head its adapter saved
                if base:  # the default model, whose recorded cache folder is gone: the adapter goes on the one built here
                    base_class = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
                    model = peft.PeftModel.from_pretrained(base_class.from_pretrained(base, dtype=dtype, **options, **labels), path)
                else:
                    model = auto.from_pretrained(path, dtype=dtype, **options, **labels)
        elif classifier:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype, **options)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **options)
    except (OSError, ValueError, ImportError) as exc:
        if attention and (isinstance(exc, ImportError) or "attn_implementation" in str(exc)):  # flash-attn not installed, a CPU, a typo
            raise PrefError(f"--attn-implementation {attention} cannot be used here: {str(exc).splitlines()[0]}; use sdpa (the default) "
                            "or eager, or install what it needs") from None
        if isinstance(exc, ImportError):
            raise
        raise _load_error(name, path, exc, local) from None
    if quantize:
        one_path_without_grad(model)
    return model


def one_path_without_grad(model: torch.nn.Module) -> None:
    """bitsandbytes computes a 4-bit layer on a CPU with AVX512-BF16 through a packed bf16 kernel when it runs in eval mode
    without grad (a reference's forward, sampling): the frozen reference would then differ from the policy it starts as,
    and the packing fails for widths not a multiple of 64 (the default model's). Its layers keep the one path, with grad or not."""
    import bitsandbytes

    for module in model.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def adapter_base(path: str) -> str | None:
    """The base model an adapter folder in PEFT's format names (its `base_model_name_or_path`), if it can be read."""
    try:
        with open(os.path.join(path, ADAPTER_CONFIG), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    base = record.get("base_model_name_or_path") if isinstance(record, dict) else None
    return base if isinstance(base, str) and base else None


@contextmanager
def quiet_peft() -> Iterator[None]:
    """No FutureWarning from peft asking transformers 5 for a renamed attribute (`is_gradient_checkpointing`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


@contextmanager
def heads_from_adapter(path: str) -> Iterator[None]:
    """No load report from transformers when all it says is that heads the adapter at `path` saved (`modules_to_save`:
    a reward model's `score`) are newly initialized: the adapter's copy replaces them."""
    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        heads = set(json.load(f).get("modules_to_save") or [])
    with quiet_new_heads(heads):
        yield


#: A causal LM's output layer, by its top-level name (most models' `lm_head`, GPT-NeoX's `embed_out`): a sequence classifier
#: loaded from the LM's checkpoint has none, and transformers reports the layer's weights UNEXPECTED where they are not tied.
LM_HEADS = ("lm_head", "embed_out")


@contextmanager
def quiet_new_heads(heads: set[str]) -> Iterator[None]:
    """No load report from transformers when all it says is that the modules `heads` (top-level names) are newly
    initialized (MISSING from the checkpoint), and that a causal LM's output layer is left out (UNEXPECTED, `LM_HEADS`: a
    classifier loaded from an LM with an untied head). Any other report is kept whole."""

    def expected(row: list[str]) -> bool:
        top, status = row[0].strip().split(".")[0], row[1].strip()
        return (status == "MISSING" and top in heads) or (status == "UNEXPECTED" and top in LM_HEADS)

    def keep(record: logging.LogRecord) -> bool:
        text = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())  # without the terminal's colours
        rows = [line.split("|") for line in text.splitlines()[2:] if "|" in line]  # the table under its header: key | status | ...
        return not ("LOAD REPORT" in text and rows and all(expected(row) for row in rows))

    reporter = logging.getLogger("transformers.modeling_utils")
    reporter.addFilter(keep)
    try:
        yield
    finally:
        reporter.removeFilter(keep)


def _load_error(name: str | None, path: str, exc: Exception, from_cache: bool = False) -> PrefError:
    """The one-line error for a model that failed to load; `from_cache`: it (or an adapter's base model) was read from the local
    Hugging Face cache alone, the hub being out of reach."""
    from pref.checkpoint import STATE_FILE  # lazily, as the loaders' own imports

    reason = (str(exc).splitlines() or [type(exc).__name__])[0]
    if REMOTE_CODE_ERROR in reason:
        return PrefError(f"{name or path} ships Python code of its own (its config's auto_map), which pref runs only when told: read it, "
                         "then pass --trust-remote-code")
    if os.path.isdir(os.path.join(path, "final")) and os.path.isfile(os.path.join(path, "run.json")):
        return PrefError(f"{path} is a pref run folder, not a model: pass its model, {os.path.join(path, 'final')}")
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return PrefError(f"{path} is a checkpoint of a pref run (for `pref run --resume`), not a model: pass the run's final/ "
                         f"(or best/) folder, or resume the run to get one")
    base = adapter_base(path) if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) else ""
    if base is None:
        return PrefError(f"{os.path.join(path, ADAPTER_CONFIG)} is damaged ({reason}): it must say which base model the adapter in {path} "
                         "is for; save the adapter again")
    if base and os.path.isabs(os.path.expanduser(base)) and not os.path.exists(os.path.expanduser(base)):
        return PrefError(f"cannot load the adapter in {path}: its base model {base} is not there; put that model back, or write where "
                         f"it is now into base_model_name_or_path in {os.path.join(path, ADAPTER_CONFIG)}")
    if from_cache:
        return PrefError(f"cannot load {base or name!r} from the local Hugging Face cache, and the hub cannot be asked for what is missing "
                         f"(it cannot be reached, or HF_HUB_OFFLINE is set): {reason}")
    if os.path.isfile(path):
        return PrefError(f"{path} is a file, not a model: pass a folder holding a saved model (a run's final/ folder)")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        return PrefError(f"{path} holds no model (no config.json): pass a folder holding a saved model (a run's final/ folder), "
                         f"or {DEFAULT_MODEL} for the embedded default model")
    if os.path.isdir(path):
        return PrefError(f"cannot load model from {path}: {reason}")
    return PrefError(
        f"cannot load model {name!r}: no such local folder and the Hugging Face hub did not provide it; "
        f"pass the path of a saved model (a run's final/ folder), or {DEFAULT_MODEL} for the embedded default model"
    )


def prompt_token_ids(tokenizer: Any, prompt: Prompt, template_options: dict[str, Any] | None = None) -> list[int]:
    """Token ids of a prompt, ending where the assistant's answer starts.

    With a chat template, a plain-text prompt becomes one user message and the
    generation prompt is appended; `template_options` are the template's own variables
    (`--chat-template-option`: Qwen3's `enable_thinking`, ...). A BOS that both the
    template and the tokenizer would add is kept once.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        ids = tokenizer(rendered(tokenizer, messages, True, template_options), add_special_tokens=False)["input_ids"]
    else:
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids


def rendered(tokenizer: Any, messages: list[dict], answer_next: bool, template_options: dict[str, Any] | None = None) -> str:
    """The chat template's text of `messages`, with the generation prompt when `answer_next`; its refusal is a one-line `PrefError`."""
    from jinja2 import TemplateError, TemplateSyntaxError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer_next, **(template_options or {}))
    except TemplateSyntaxError as exc:  # a --chat-template file's own mistake
        raise PrefError(f"the chat template is no valid Jinja: {exc.message} (line {exc.lineno}); fix the --chat-template file") from None
    except TemplateError as exc:  # the template's own check (roles that must alternate, a variable's value, ...)
        raise PrefError(f"the model's chat template refused a prompt: {exc}; give prompts it accepts, or other --chat-template-option "
                        f"values ({', '.join(f'{k}={v}' for k, v in (template_options or {}).items()) or 'none given'})") from None


def conversation_token_ids(tokenizer: Any, conversation: list[dict], template_options: dict[str, Any] | None = None,
                           end: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation, and a mask of 1 on each assistant answer (SFT on every turn, TRL's assistant_only_loss).

    Each answer is what `completion_token_ids` gives (its text, then one `end`), after the turns before it: the first
    as `prompt_token_ids` gives them, so a conversation of one answer is the row its prompt and answer make; the
    others as the chat template writes them after the answer before. A template that writes earlier turns otherwise
    once later ones follow (one that drops earlier reasoning) cannot be cut so: a `PrefError` says so.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise PrefError("training every assistant turn of a conversation needs the model's chat template, and this tokenizer has none")
    ids: list[int] = []
    mask: list[int] = []
    written = ""  # the template's text of the turns so far
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        before = rendered(tokenizer, conversation[:i], True, template_options)
        if not before.startswith(written) or not i:
            raise PrefError("the model's chat template writes a conversation's earlier turns otherwise once later turns follow (or it "
                            "starts with an answer), so its answers cannot each be trained in one row; train on the last answer only")
        turns = prompt_token_ids(tokenizer, conversation[:i], template_options) if not ids else \
            tokenizer(before[len(written):], add_special_tokens=False)["input_ids"]
        answer = completion_token_ids(tokenizer, message["content"], end)
        ids, mask = ids + turns + answer, mask + [0] * len(turns) + [1] * len(answer)
        written = rendered(tokenizer, conversation[: i + 1], False, template_options)
    return ids, mask


def completion_token_ids(tokenizer: Any, completion: str, end: int | None = None) -> list[int]:
    """Token ids of an answer, ending with exactly one `end` (by default the EOS; `answer_end_id` for a chat model)."""
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    end = tokenizer.eos_token_id if end is None else end
    if end is not None and (not ids or ids[-1] != end):
        ids = ids + [end]
    return ids


def answer_end_id(tokenizer: Any, template_options: dict[str, Any] | None = None) -> int | None:
    """The token that ends an assistant's answer: the first special token the chat template writes after an assistant
    turn (Gemma's `<end_of_turn>`, Phi-3's `<|end|>`, Qwen's `<|im_end|>`), which the model emits and sampling stops at;
    the EOS without a template, or where the template writes none or cannot render such a turn."""
    eos, mark = tokenizer.eos_token_id, "PREFANSWERMARK"
    if not getattr(tokenizer, "chat_template", None):
        return eos
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": mark}], tokenize=False,
                                             **(template_options or {}))
    except Exception:  # a template with rules of its own (a system turn first, ...): the EOS
        return eos
    if mark not in text:
        return eos
    special = set(tokenizer.all_special_ids) | {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    after = tokenizer(text.split(mark, 1)[1], add_special_tokens=False)["input_ids"]
    return next((i for i in after if i in special), eos)


def turn_off_dropout(model: torch.nn.Module) -> None:
    """Every dropout of `model` (its own and an adapter's) to 0, as TRL's `disable_dropout`: no noise in the log-ratios."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def prepare_for_training(model: torch.nn.Module, config: Any, kind: str = "causal-lm", adapter: Adapter | None = None) -> torch.nn.Module:
    """The model to train as `config` says: with the plan's adapter (LoRA, ...; then a `peft` model) and gradient checkpointing."""
    if adapter is not None:
        with quiet_peft():
            model = adapter.wrap(model, kind)
    if config.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", True):
            raise PrefError(f"{type(model).__name__} does not support gradient checkpointing; drop --gradient-checkpointing")
        # non-reentrant: recomputation that works with frozen inputs; peft still wants the inputs to require grad
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if adapter is not None:
            model.enable_input_require_grads()
        model.config.use_cache = False
    return model
