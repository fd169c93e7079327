"""Prompts go through the chat template once, with no doubled BOS or EOS."""

import os

from transformers import AutoTokenizer

from pref.models import completion_token_ids, prompt_token_ids


def test_plain_prompt_becomes_a_user_turn(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = prompt_token_ids(tok, "Name a fruit.")
    expected = tok.apply_chat_template([{"role": "user", "content": "Name a fruit."}], tokenize=False, add_generation_prompt=True)
    assert tok.decode(ids) == tok.decode(tok(expected, add_special_tokens=False)["input_ids"])
    assert ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")


def test_message_list_prompt_keeps_system_turn(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Who are you?"}]
    text = tok.decode(prompt_token_ids(tok, messages))
    assert "<|system|>" in text and "<|user|>" in text


def test_bos_from_template_and_tokenizer_is_kept_once(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    bos = tok.bos_token or "<bos>"
    tok.bos_token = bos
    # a template that writes BOS itself, as Llama-style templates do
    tok.chat_template = "{{ bos_token }}{% for m in messages %}<|user|> {{ m['content'] }} <|end|> {% endfor %}<|assistant|>"
    ids = prompt_token_ids(tok, "Name a fruit.")
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_no_template_uses_tokenizer_special_tokens(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    ids = prompt_token_ids(tok, "name a fruit .")
    text = [i for i in ids if i not in tok.all_special_ids]
    assert tok.decode(text) == "name a fruit ." and text == tok("name a fruit .", add_special_tokens=False)["input_ids"]


def test_completion_ends_with_one_eos(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    eos = tok.eos_token_id
    assert completion_token_ids(tok, "apple")[-1] == eos
    assert completion_token_ids(tok, "apple").count(eos) == 1
    assert completion_token_ids(tok, "apple " + tok.eos_token).count(eos) == 1


def test_an_answer_ends_with_the_token_the_template_ends_an_assistant_turn_with(tiny_model_dir):
    """Gemma's and Phi-3's templates end a turn with a token of their own, not the tokenizer's EOS: encoded answers end
    with it (what the model emits, and what sampling stops at), once; where the turn ends with the EOS, with the EOS."""
    from pref.policy import HFPolicy

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert HFPolicy(None, tok).answer_end == tok.eos_token_id  # the default model's template ends turns with its EOS
    tok.add_special_tokens({"additional_special_tokens": ["<end_of_turn>"]})
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    tok.chat_template = ("{% for m in messages %}<|user|> {{ m['content'] }}<end_of_turn>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    policy = HFPolicy(None, tok)
    assert policy.answer_end == end_of_turn != tok.eos_token_id
    rows = policy.encode(["Name a fruit.", "Name a fruit."], ["apple", "apple<end_of_turn>"])
    for ids, mask in zip(rows.input_ids, rows.completion_mask):
        answer = ids[mask.bool()].tolist()
        assert answer[-1] == end_of_turn and answer.count(end_of_turn) == 1 and tok.eos_token_id not in answer
    tok.chat_template = "{{ raise_exception('a system turn must come first') }}"
    assert HFPolicy(None, tok).answer_end == tok.eos_token_id


#: Qwen3's way: an assistant turn opens with an empty thinking block when `enable_thinking` is false.
THINKING = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% if m['role'] == 'assistant' %}<|end|> {% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking is defined and enable_thinking is false %} no thoughts .{% endif %}"
            "{% endif %}")


def thinking_model(tiny_model_dir, path):
    """The tiny model with the template above, as a Hugging Face folder."""
    import shutil

    shutil.copytree(tiny_model_dir, path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = THINKING
    tok.save_pretrained(path)
    return str(path)


def test_chat_template_options_reach_every_prompt_of_a_run_and_of_generate(tmp_path, tiny_model_dir, prefs_file):
    import json

    from click.testing import CliRunner

    from pref.cli.main import Loading, cli, load_policy
    from pref.config import build_config
    from pref.registry import load_registry
    from pref.train import train_policy

    model = thinking_model(tiny_model_dir, tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(model)
    assert tok.decode(prompt_token_ids(tok, "Hi")).endswith("<|assistant|>")
    assert tok.decode(prompt_token_ids(tok, "Hi", {"enable_thinking": False})).endswith("<|assistant|> no thoughts .")
    result = CliRunner().invoke(cli, ["run", "--objective", "dpo", "--model", model, "--dataset", prefs_file, "--steps", "1", "--batch-size", "2",
                                      "--device", "cpu", "--output-dir", str(tmp_path / "run"), "--chat-template-option", "enable_thinking=false"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.load(open(tmp_path / "run" / "run.json"))["config"]["chat_template_options"] == {"enable_thinking": False}
    config = build_config(flags={"objective": "dpo", "model": model, "dataset": [prefs_file], "steps": 1, "batch_size": 2, "device": "cpu",
                                 "output_dir": str(tmp_path / "again"), "chat_template_options": {"enable_thinking": False}})
    _, policy = train_policy(config, load_registry())
    assert "<|assistant|> no thoughts . apple" in tok.decode(policy.encode(["Name a fruit."], ["apple"]).input_ids[0])
    loaded = load_policy(model, Loading(device="cpu", template_options=(("enable_thinking", False),)))
    assert "no thoughts" in tok.decode(loaded.encode(["Hi"], ["a"]).input_ids[0])
    result = CliRunner().invoke(cli, ["generate", "--model", model, "--prompt", "Hi", "--max-new-tokens", "2", "--device", "cpu",
                                      "--chat-template-option", "enable_thinking=false"])
    assert result.exit_code == 0, (result.output, result.exception)


def test_a_template_that_refuses_a_prompt_is_a_one_line_error(tmp_path, tiny_model_dir, prefs_file):
    from click.testing import CliRunner

    from pref.cli.main import cli

    model = thinking_model(tiny_model_dir, tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = "{% if enable_thinking is defined and enable_thinking is not boolean %}{{ raise_exception('enable_thinking is true or false') }}{% endif %}" + THINKING
    tok.save_pretrained(model)
    result = CliRunner().invoke(cli, ["run", "--objective", "dpo", "--model", model, "--dataset", prefs_file, "--steps", "1", "--device", "cpu",
                                      "--output-dir", str(tmp_path / "run"), "--chat-template-option", "enable_thinking=maybe"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == ("Error: the model's chat template refused a prompt: enable_thinking is true or false; "
                                                      "give prompts it accepts, or other --chat-template-option values (enable_thinking=maybe)")


ROLES = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


def test_a_run_takes_its_chat_template_from_a_jinja_file_or_another_models_tokenizer(tmp_path, tiny_model_dir, prefs_file, monkeypatch):
    """A base model's run takes the template --chat-template names (TRL's chat_template_path): its prompts are written by it,
    final/ keeps it for eval and generate, run.json records the file absolute, and a resume keeps it."""
    import json

    from click.testing import CliRunner

    from pref.cli.main import cli
    from pref.models import load_tokenizer

    (tmp_path / "roles.jinja").write_text(ROLES)
    instruct = tmp_path / "instruct"  # a tokenizer whose template is ROLES
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = ROLES
    tok.save_pretrained(instruct)
    for source in ("roles.jinja", str(instruct)):
        monkeypatch.chdir(tmp_path)
        tok = load_tokenizer(tiny_model_dir, source)
        assert tok.chat_template == ROLES
        assert prompt_token_ids(tok, "Hi") == tok(f"<user> Hi {tok.eos_token}<assistant>", add_special_tokens=False)["input_ids"]
    run = tmp_path / "run"
    flags = ["run", "--objective", "dpo", "--model", tiny_model_dir, "--dataset", prefs_file, "--batch-size", "2", "--device", "cpu",
             "--output-dir", str(run), "--chat-template", "roles.jinja"]
    result = CliRunner().invoke(cli, [*flags, "--steps", "2", "--save-every", "1"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert AutoTokenizer.from_pretrained(run / "final").chat_template == ROLES
    assert json.load(open(run / "run.json"))["config"]["chat_template"] == str(tmp_path / "roles.jinja")
    result = CliRunner().invoke(cli, ["generate", "--model", tiny_model_dir, "--chat-template", "roles.jinja", "--prompt", "Hi",
                                      "--max-new-tokens", "2", "--device", "cpu"])  # the base model, prompted as the run prompted it
    assert result.exit_code == 0, (result.output, result.exception)
    from pref.cli.main import Loading, load_policy

    assert load_policy(tiny_model_dir, Loading(device="cpu", chat_template="roles.jinja")).tokenizer.chat_template == ROLES
    (tmp_path / "other.jinja").write_text(ROLES.replace("<assistant>", "<bot>"))
    result = CliRunner().invoke(cli, [*flags[:-1], "other.jinja", "--steps", "3", "--resume", str(run)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "chat_template" in result.output and "other.jinja" in result.output, result.output


def test_a_chat_template_that_cannot_serve_is_a_one_line_error(tmp_path, tiny_model_dir, prefs_file):
    from click.testing import CliRunner

    from pref.cli.main import cli

    (tmp_path / "empty.jinja").write_text("  \n")
    (tmp_path / "latin.jinja").write_bytes("{{ 'café' }}".encode("latin-1"))
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m['content'] }}")
    bare = tmp_path / "bare"  # a tokenizer without a template
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    tok.save_pretrained(bare)
    cases = [("missing.jinja", "--chat-template: no such file missing.jinja"),
             ("empty.jinja", "--chat-template empty.jinja is empty: give a Jinja chat template file, or a model whose tokenizer has one"),
             ("broken.jinja", "the chat template is no valid Jinja: Unexpected end of template."),
             ("latin.jinja", "--chat-template latin.jinja is not UTF-8 text: give a Jinja chat template file"),
             (str(bare), f"--chat-template {bare}: its tokenizer has no chat template; give a Jinja file of the one to use"),
             (str(tmp_path / "nowhere"), f"--chat-template {tmp_path / 'nowhere'} is no file, and no model whose tokenizer could be read: "
                                         f"cannot load model '{tmp_path / 'nowhere'}'")]
    for source, message in cases:
        path = source if os.path.isabs(source) else str(tmp_path / source) if source != "missing.jinja" else source
        result = CliRunner().invoke(cli, ["run", "--objective", "dpo", "--model", tiny_model_dir, "--dataset", prefs_file, "--steps", "1",
                                          "--device", "cpu", "--output-dir", str(tmp_path / "run"), "--chat-template", path])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert message.replace(source, path) in " ".join(result.output.split()), result.output
