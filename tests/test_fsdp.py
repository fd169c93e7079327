"""`pref run --fsdp` on two CPU processes (gloo): pref shards the model with torch's FSDP2 itself.

accelerate 1.15 never turns its own FSDP on for CPU processes (`Accelerator(cpu=True,
fsdp_plugin=...)` and ACCELERATE_USE_FSDP still give plain multi-CPU data parallelism),
so these runs are what shows sharded training here: the sharded run trains the weights the
same run trains unsharded (DDP), a sharded run resumed from a checkpoint ends with exactly
the same weights, `final/` is a plain `transformers` model, LoRA trains sharded too, and
online objectives sample through the sharded model.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from distributed_runs import launch as launch_runs  # tests/ is on sys.path
from trained_alike import assert_trained_alike


def launch(cache, folder, plan: list) -> None:
    """Two CPU processes under `accelerate launch` take the steps of `plan` (see distributed_runs.py): `pref run`s in a row."""
    done = launch_runs(plan, cache, folder)
    assert done.returncode == 0, done.stderr[-4000:]


def weights(run_dir, name="model.safetensors"):
    return load_file(os.path.join(run_dir, "final", name))


@pytest.mark.slow
def sharded_forwards(folder, name: str) -> int:
    """The forwards of a sharded frozen model that each process recorded in NAME.RANK.json (tests/reference_shards.py), checked: at
    each, each process held about half of the weights and nothing was left gathered after it; their number, the same on both."""
    forwards = [json.loads((folder / f"{name}.{rank}.json").read_text()) for rank in (0, 1)]
    assert len(forwards[0]) == len(forwards[1])
    for first, second in zip(*forwards):
        assert first["held"] + second["held"] == first["whole"] and max(first["held"], second["held"]) < 0.55 * first["whole"]
        assert first["gathered_after"] == second["gathered_after"] == 0
    return len(forwards[0])


def test_sharded_run_matches_ddp_resumes_exactly_and_saves_a_plain_model(tiny_model_dir, prefs_file, private_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    # batch 1 x 2 accumulated micro-batches: the first micro-batch's gradients are kept unsynchronised
    # 2 of the 6 pairs held out and evaluated every 2 steps: the best model is gathered whole too
    args = ["--objective", "dpo", "--model", tiny_model_dir, "--dataset", prefs_file, "--steps", "4", "--batch-size", "1",
            "--grad-accum", "2", "--save-every", "2", "--lr", "1e-3", "--seed", "0", "--device", "cpu", "--max-length", "64",
            "--validation-split", "0.34", "--eval-every", "2", "--test-prompt", "Name a fruit."]
    # one launch: the DDP run, the sharded run, a copy of it stopped after step 3 (final/ gone), and the copy resumed;
    # the sharded run's process 0 computes the reference's log-probs where process 1 finds them cached (by the DDP run):
    # only one of them has run the packing probe on the whole model, and the other's probe, sharded, must not wait on it
    # the copy resumes sampling its test prompts layer by layer (--sample-sharded), which changes no answer and no weight;
    # then a frozen-copy reference (--reference model, 2 steps, evaluated at the last), unsharded and sharded, which TR-DPO
    # moves towards the policy after each step (checkpointed after the first); and the sharded run resumed from that checkpoint
    resumed = tmp_path / "resumed"
    frozen = ["--objective", "dpo", "--model", tiny_model_dir, "--dataset", prefs_file, "--steps", "2", "--batch-size", "1", "--lr", "1e-3",
              "--seed", "0", "--device", "cpu", "--max-length", "64", "--validation-split", "0.34", "--reference", "model",
              "-o", "sync_ref_model=true", "-o", "ref_model_sync_steps=1", "-o", "ref_model_mixup_alpha=0.5", "--save-every", "1"]
    # then BEMA's reference (3 steps), unsharded and sharded: averages of each weight's pieces, resumed from step 1's checkpoint
    bema = [*frozen[:frozen.index("-o")], "-o", "bema_reference=true", "-o", "bema_update_freq=1", "-o", "ref_model_update_freq=1", "--save-every", "1"]
    bema[bema.index("--steps") + 1] = "3"
    report = tmp_path / "reference"
    # and 2 pairs, one per process: the reference's log-probs are one forward, which process 0 computes and process 1 waits
    # for; process 1 has run no packed forward, and its packing probe, sharded, would wait on process 0 alone (a hang)
    (tmp_path / "two.jsonl").write_text("".join(open(prefs_file).readlines()[:2]))
    few = ["--objective", "dpo", "--model", tiny_model_dir, "--dataset", str(tmp_path / "two.jsonl"), "--steps", "1", "--batch-size", "4",
           "--seed", "0", "--device", "cpu"]
    launch(private_cache, tmp_path, [["run", *args, "--output-dir", str(tmp_path / "ddp")],
                                    {"cache": [str(tmp_path / "cold-cache"), str(private_cache)]},
                                    ["run", *args, "--fsdp", "--output-dir", str(tmp_path / "fsdp")],
                                    {"copy": str(tmp_path / "fsdp"), "to": str(resumed)},
                                    ["run", "--resume", str(resumed / "checkpoint-000002"), "--sample-sharded"],
                                    ["run", *frozen, "--output-dir", str(tmp_path / "ddp-frozen")],
                                    {"main": "reference_shards", "args": [str(report), "run", *frozen, "--fsdp", "--output-dir",
                                                                          str(tmp_path / "fsdp-frozen")]},
                                    {"copy": str(tmp_path / "fsdp-frozen"), "to": str(tmp_path / "resumed-frozen")},
                                    ["run", "--resume", str(tmp_path / "resumed-frozen" / "checkpoint-000001")],
                                    ["run", *bema, "--output-dir", str(tmp_path / "ddp-bema")],
                                    ["run", *bema, "--fsdp", "--output-dir", str(tmp_path / "fsdp-bema")],
                                    {"copy": str(tmp_path / "fsdp-bema"), "to": str(tmp_path / "resumed-bema")},
                                    ["run", "--resume", str(tmp_path / "resumed-bema" / "checkpoint-000001")],
                                    ["run", *few, "--fsdp", "--output-dir", str(tmp_path / "fsdp-few")]])
    ddp, sharded, start = weights(tmp_path / "ddp"), weights(tmp_path / "fsdp"), load_file(os.path.join(tiny_model_dir, "model.safetensors"))

    # the same weights up to the rounding of another reduction order: Adam turns rounding into
    # differences of ~1e-7 here, while the 4 steps move the weights by up to ~4e-3
    assert sharded.keys() == ddp.keys()
    assert max(float((ddp[k] - start[k]).abs().max()) for k in ddp) > 1e-3
    assert_trained_alike(sharded, ddp, atol=2e-5)

    # the checkpoints hold the same tensors: the sharded optimizer state is saved whole
    optimizers = [torch.load(tmp_path / run / "checkpoint-000002" / "optimizer.pt", weights_only=True) for run in ("ddp", "fsdp")]
    assert optimizers[0]["param_groups"] == optimizers[1]["param_groups"]
    for index, state in optimizers[0]["state"].items():
        torch.testing.assert_close(optimizers[1]["state"][index]["exp_avg"], state["exp_avg"], atol=1e-6, rtol=0)

    # the same validation losses, and the same best model, saved whole
    def validation_losses(run):
        lines = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [line["validation/loss"] for line in lines if "validation/loss" in line]

    assert len(validation_losses("fsdp")) == 2
    assert validation_losses("fsdp") == pytest.approx(validation_losses("ddp"), abs=1e-5)
    best = {run: load_file(tmp_path / run / "best" / "model.safetensors") for run in ("ddp", "fsdp")}
    assert best["fsdp"].keys() == best["ddp"].keys()
    assert_trained_alike(best["fsdp"], best["ddp"], atol=2e-5)

    # the test prompts are answered through the sharded model as through the whole one
    answers = {run: (tmp_path / run / "generations.jsonl").read_text() for run in ("ddp", "fsdp")}
    assert answers["fsdp"] == answers["ddp"] and answers["ddp"].count('"step"') == 2

    # final/ is a plain transformers model
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "final").state_dict()
    for key in sharded:
        assert torch.equal(loaded[key], sharded[key]), key

    # resumed from checkpoint 2 (its final/ gone, as if stopped after step 3): the uninterrupted run's weights, bit for bit
    # (stopping a run at any point and resuming it is tested in tests/test_fault_injection.py); sampling layer by layer,
    # it answers the test prompts as the run that gathered the whole model, and its record says what the resume changed
    again = weights(resumed)
    assert again.keys() == sharded.keys()
    for key in sharded:
        assert torch.equal(again[key], sharded[key]), key
    assert (resumed / "generations.jsonl").read_text() == answers["fsdp"]
    record = json.loads((resumed / "run.json").read_text())
    assert record["resumes"] == [{"step": 2, "changed": {"sample_sharded": [False, True]}}]

    # a frozen-copy reference sharded too: each process held half of it at each of its forwards (the same number on both),
    # with nothing left gathered after them, and the run trained the weights of the same run with a whole copy on each process
    assert sharded_forwards(tmp_path, "reference") > 2  # the training steps' and the validation's
    ddp, sharded = weights(tmp_path / "ddp-frozen"), weights(tmp_path / "fsdp-frozen")
    assert max(float((ddp[k] - start[k]).abs().max()) for k in ddp) > 1e-4
    assert_trained_alike(sharded, ddp, atol=2e-6)
    assert validation_losses("fsdp-frozen") == pytest.approx(validation_losses("ddp-frozen"), abs=1e-6)
    # TR-DPO moved the sharded reference as the whole one (each process mixing its own pieces), its checkpoint holds it
    # gathered whole, and the run resumed from there loads it back into the shards: the uninterrupted run's weights, bit for bit
    moved = {run: load_file(tmp_path / run / "checkpoint-000001" / "reference.safetensors") for run in ("ddp-frozen", "fsdp-frozen")}
    assert moved["fsdp-frozen"].keys() == moved["ddp-frozen"].keys()
    assert max(float((moved["ddp-frozen"][k] - start[k]).abs().max()) for k in start) > 1e-4
    assert_trained_alike(moved["fsdp-frozen"], moved["ddp-frozen"], atol=2e-6)
    again = weights(tmp_path / "resumed-frozen")
    for key in sharded:
        assert torch.equal(again[key], sharded[key]), key
    # BEMA's averages were kept as sharded as the weights, checkpointed whole and cut again at the resume: bit for bit
    ddp, sharded, again = (weights(tmp_path / run) for run in ("ddp-bema", "fsdp-bema", "resumed-bema"))
    assert_trained_alike(sharded, ddp, atol=2e-6)
    for key in sharded:
        assert torch.equal(again[key], sharded[key]), key
    saved = load_file(tmp_path / "fsdp-bema" / "checkpoint-000001" / "reference.safetensors")
    assert {key.split("/")[1] for key in saved if key.startswith("state/")} == {"theta0", "ema", "averaged"}
    assert (tmp_path / "fsdp-few" / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_lora_ppo_grpo_a2po_and_distill_train_sharded_as_unsharded(tiny_model_dir, private_cache, tmp_path):
    """PPO with LoRA: both runs sample through the model (sharded: the processes gather the weights together, and one whose
    samples ended keeps stepping with the others, or their gathers would wait forever). LoRA's random adapters and the value
    head outside the shards start from process 0's, so the adapters and the test prompts' answers end as the DDP run's,
    and the sharded run resumed from its checkpoint ends with the same adapters, bit for bit. Then GRPO with a KL term to a
    frozen-copy reference, which --fsdp shards too, A*-PO, which samples every prompt before training, and distill from a teacher
    that --fsdp shards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = ["--objective", "ppo", "-k", "2", "-o", "ppo_epochs=2", "--reward", "noun-diversity", "--model", tiny_model_dir, "--steps", "4",
            "--batch-size", "2", "--save-every", "2", "--lr", "1e-2", "--seed", "0", "--device", "cpu", "--max-new-tokens", "8",
            "--test-prompt", "Name a fruit.", "--lora", "--lora-option", "target_modules=q_proj,v_proj", "--merge-lora"]
    # then GRPO with a KL term to a frozen-copy reference (2 steps), unsharded and sharded (the reference too, sampling layer by layer)
    grpo = ["--objective", "grpo", "-k", "2", "--beta", "0.1", "--reward", "noun-diversity", "--model", tiny_model_dir, "--steps", "2",
            "--batch-size", "2", "--lr", "1e-2", "--seed", "0", "--device", "cpu", "--max-new-tokens", "8", "--test-prompt", "Name a fruit."]
    # then A*-PO's samples of every prompt before training: 3 prompts over 2 processes, a prompt at a time, so process 1 has one
    # (sharded, it samples once more with process 0, or their gathers would wait forever), unsharded and sharded
    (tmp_path / "three.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Name a fruit.", "Name an animal.", "Name a tool.")))
    a2po = ["--objective", "a2po", "--reward", "noun-diversity", "--dataset", str(tmp_path / "three.jsonl"), "--model", tiny_model_dir,
            "--steps", "2", "--batch-size", "1", "--save-every", "1", "-o", "num_value_samples=2", "-o", "filter_all_incorrect=false",
            "--seed", "0", "--device", "cpu", "--max-new-tokens", "4"]
    # then distill from a teacher (the tiny model, its weights moved), which --fsdp shards too: its output layer gathered whole
    teacher = tmp_path / "teacher"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(teacher)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(teacher)
    distill = ["--objective", "distill", "--reference-model", str(teacher), "--dataset", str(tmp_path / "three.jsonl"), "--model", tiny_model_dir,
               "--steps", "2", "--batch-size", "1", "-o", "beta=0.5", "--lr", "1e-2", "--seed", "0", "--device", "cpu", "--max-new-tokens", "8"]
    resumed, report = tmp_path / "resumed", tmp_path / "reference"  # one launch, as in the test above
    launch(private_cache, tmp_path, [["run", *args, "--output-dir", str(tmp_path / "ddp")],
                                    ["run", *args, "--fsdp", "--output-dir", str(tmp_path / "fsdp")],
                                    {"copy": str(tmp_path / "fsdp"), "to": str(resumed)},
                                    ["run", "--resume", str(resumed)],  # from checkpoint-000002
                                    ["run", *grpo, "--output-dir", str(tmp_path / "ddp-grpo")],
                                    {"main": "reference_shards", "args": [str(report), "run", *grpo, "--fsdp", "--sample-sharded",
                                                                          "--output-dir", str(tmp_path / "fsdp-grpo")]},
                                    ["run", *a2po, "--output-dir", str(tmp_path / "ddp-a2po")],
                                    ["run", *a2po, "--fsdp", "--output-dir", str(tmp_path / "fsdp-a2po")],
                                    ["run", *distill, "--output-dir", str(tmp_path / "ddp-distill")],
                                    {"main": "reference_shards", "args": [str(tmp_path / "teacher-shards"), "run", *distill, "--fsdp",
                                                                          "--output-dir", str(tmp_path / "fsdp-distill")]}])
    ddp, sharded = weights(tmp_path / "ddp", "adapter_model.safetensors"), weights(tmp_path / "fsdp", "adapter_model.safetensors")
    assert sharded.keys() == ddp.keys() and any(float(v.abs().max()) > 0 for k, v in ddp.items() if "lora_B" in k)
    assert_trained_alike(sharded, ddp, atol=2e-5)
    answers = {run: (tmp_path / run / "generations.jsonl").read_text() for run in ("ddp", "fsdp")}
    assert answers["fsdp"] == answers["ddp"] and '"step": 4' in answers["ddp"]
    # --merge-lora: the sharded run folds its gathered adapters into a copy built from the gathered weights
    merged = {run: weights(tmp_path / run, os.path.join("merged", "model.safetensors")) for run in ("ddp", "fsdp")}
    base = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert merged["fsdp"].keys() == merged["ddp"].keys() == base.keys()
    assert not torch.equal(merged["ddp"]["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert_trained_alike(merged["fsdp"], merged["ddp"], atol=2e-5)

    again = weights(resumed, "adapter_model.safetensors")
    for key in sharded:
        assert torch.equal(again[key], sharded[key]), key

    # GRPO's frozen reference, sharded, held half of its weights on each process at each forward; sampled layer by layer,
    # the run drew the DDP run's samples and ends with its weights and answers
    forwards = [json.loads((tmp_path / f"reference.{rank}.json").read_text()) for rank in (0, 1)]
    assert len(forwards[0]) == len(forwards[1]) == 2  # one per rollout
    for first, second in zip(*forwards):
        assert first["held"] + second["held"] == first["whole"] and max(first["held"], second["held"]) < 0.55 * first["whole"]
    ddp, sharded, start = weights(tmp_path / "ddp-grpo"), weights(tmp_path / "fsdp-grpo"), load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert max(float((ddp[k] - start[k]).abs().max()) for k in ddp) > 1e-3
    assert_trained_alike(sharded, ddp, atol=2e-5)
    assert (tmp_path / "fsdp-grpo" / "generations.jsonl").read_text() == (tmp_path / "ddp-grpo" / "generations.jsonl").read_text()

    # A*-PO: each process sampled its share of the prompts; every process holds V* of all three, sharded as unsharded
    tables = [torch.load(tmp_path / run / "checkpoint-000001" / "extra.pt", weights_only=True)["objective"][rank]["values"]
              for run in ("ddp-a2po", "fsdp-a2po") for rank in (0, 1)]
    assert len(tables[0]) == 3 and all(table == tables[0] for table in tables)

    # distill: the teacher held half of its weights on each process at each forward, nothing left gathered after it (its output
    # layer gathered whole for the loss alone), and the run trained the weights of the unsharded one
    assert sharded_forwards(tmp_path, "teacher-shards") == 2
    ddp, sharded = weights(tmp_path / "ddp-distill"), weights(tmp_path / "fsdp-distill")
    assert max(float((ddp[k] - start[k]).abs().max()) for k in ddp) > 1e-3
    assert_trained_alike(sharded, ddp, atol=2e-5)
