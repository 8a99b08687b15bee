"""The PyTorch side: transformers forward / `generate`, TRL 1.16 trainers with their defaults
except what must match ours (batch, lengths, steps, lr, precision, LoRA, GRPO's beta / group
/ update passes). Each runs in a `bench.py --worker` child; the driver measures its peak RSS.

Step time: a TrainerCallback from on_step_begin to on_step_end (forward, backward, clip,
optimizer; CUDA synchronised), the median of the steps after the warm-up."""

from __future__ import annotations

import statistics
import tempfile
import time

LORA = dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])  # = ours' lora block


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _device_peak_gib():
    import torch
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _device() -> str:
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _step_timer():
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.logs, self._t0 = [], [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():  # kernels run asynchronously: wait for the step
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                self.logs.append(dict(logs))

    return StepTimer()


def _common(job: dict, out: str) -> dict:
    """What every trainer must share with ours; everything else stays TRL's default (but
    gradient checkpointing, on by default, is switched off for a `gc: off` row)."""
    extra = {"gradient_checkpointing": False} if job.get("gc") == "off" else {}
    return dict(**extra, output_dir=out, max_steps=job["warmup"] + job["steps"],
                per_device_train_batch_size=job["batch"], learning_rate=job["lr"],
                bf16=job["precision"] == "bf16", use_cpu=not _cuda(), report_to="none",
                save_strategy="no", disable_tqdm=True, logging_steps=1)


def _result(timer, job: dict, **extra) -> dict:
    w = job["warmup"]
    loss1 = next((l["loss"] for l in timer.logs if "loss" in l), None)
    return dict(step_s=statistics.median(timer.times[w:]), first_step_s=timer.times[0],
                compile_s=None, loss1=loss1, peak_dev_gib=_device_peak_gib(), device=_device(), **extra)


def _peft(job: dict):
    if not job.get("lora"):
        return None
    from peft import LoraConfig
    return LoraConfig(task_type="CAUSAL_LM", **LORA)


# ----------------------------------------------------------------------------- train

def sft(job: dict) -> dict:
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    # Pre-tokenized rows (the CLI's): the collator makes labels = input_ids, nothing to pad.
    data = datasets.Dataset.from_dict({"input_ids": job["rows"]})
    timer = _step_timer()
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(**_common(job, out), max_length=job["seq"],
                         dataset_kwargs={"skip_prepare_dataset": True}, train_sampling_strategy="sequential")
        trainer = SFTTrainer(model=job["model"], args=args, train_dataset=data,
                             processing_class=AutoTokenizer.from_pretrained(job["model"]),
                             peft_config=_peft(job), callbacks=[timer])
        trainer.train()
    return _result(timer, job, gradient_checkpointing=args.gradient_checkpointing)


def dpo(job: dict) -> dict:
    import datasets
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    class PreTokenizedDPOTrainer(DPOTrainer):
        """TRL 1.16 always tokenizes text pairs (appending EOS); ours are already ids."""
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    rows = job["pairs"]
    data = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]})
    timer = _step_timer()
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(**_common(job, out), max_length=job["seq"], train_sampling_strategy="sequential")
        trainer = PreTokenizedDPOTrainer(model=job["model"], args=args, train_dataset=data,
                                         processing_class=AutoTokenizer.from_pretrained(job["model"]),
                                         peft_config=_peft(job), callbacks=[timer])
        first = trainer.data_collator([data[i] for i in range(job["batch"])])
        want = [r["prompt_ids"] + r[k] for k in ("chosen_ids", "rejected_ids") for r in rows[:job["batch"]]]
        assert first["input_ids"].tolist() == want and bool(first["attention_mask"].all()), \
            "TRL's first batch differs from ours"
        trainer.train()
    return _result(timer, job, gradient_checkpointing=args.gradient_checkpointing)


def rm(job: dict) -> dict:
    import datasets
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    rows = job["pairs"]  # processed columns: TRL uses them as they are
    data = datasets.Dataset.from_dict({"chosen_ids": [r["prompt_ids"] + r["chosen_ids"] for r in rows],
                                       "rejected_ids": [r["prompt_ids"] + r["rejected_ids"] for r in rows]})
    timer = _step_timer()
    with tempfile.TemporaryDirectory() as out:
        args = RewardConfig(**_common(job, out), max_length=job["seq"], train_sampling_strategy="sequential")
        trainer = RewardTrainer(model=job["model"], args=args, train_dataset=data,
                                processing_class=AutoTokenizer.from_pretrained(job["model"]),
                                callbacks=[timer])
        trainer.train()
    return _result(timer, job, gradient_checkpointing=args.gradient_checkpointing)


def grpo(job: dict) -> dict:
    """One generation of batch x generations rows, then `epochs` optimizer steps on it (ours'
    default ppo.epochs with one minibatch); reward = jaxalign.rewards:arithmetic on the text."""
    import datasets
    from transformers import AutoTokenizer, PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from jaxalign.rewards import arithmetic

    def reward(prompts, completions, **kw):
        return arithmetic([p[-1]["content"] for p in prompts], [c[-1]["content"] for c in completions])

    rollout_s = []

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            if _cuda():
                import torch
                torch.cuda.synchronize()
            rollout_s.append(time.perf_counter() - t0)
            return out

    rows, epochs = job["batch"] * job["generations"], job["epochs"]
    iterations = job["warmup"] + job["steps"]
    data = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in job["prompts"]]})
    timer = _step_timer()
    with tempfile.TemporaryDirectory() as out:
        common = _common(job, out)
        common.update(max_steps=iterations * epochs, per_device_train_batch_size=rows)
        args = GRPOConfig(**common, num_generations=job["generations"], num_iterations=epochs,
                          max_completion_length=job["new_tokens"], beta=job["beta"],
                          generation_kwargs={"min_new_tokens": job["new_tokens"]},
                          shuffle_dataset=False, model_init_kwargs={"dtype": "float32"})
        trainer = TimedGRPOTrainer(model=job["model"], args=args, train_dataset=data, reward_funcs=[reward],
                                   processing_class=AutoTokenizer.from_pretrained(job["model"]),
                                   callbacks=[timer])
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    per_it = [sum(timer.times[i * epochs:(i + 1) * epochs]) for i in range(iterations)]
    w = job["warmup"]
    lengths = [l["completions/mean_length"] for l in timer.logs if "completions/mean_length" in l]
    return dict(step_s=statistics.median(per_it[w:]), first_step_s=per_it[0], compile_s=None,
                rollout_s=statistics.median(rollout_s[w:]) if len(rollout_s) > w else None,
                response_length=statistics.mean(lengths[w:] or lengths) if lengths else None,
                gradient_checkpointing=args.gradient_checkpointing,
                peak_dev_gib=_device_peak_gib(), device=_device())


# ----------------------------------------------------------------------------- inference

def _model(job: dict):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
    return model.to("cuda") if _cuda() else model


def _autocast(job: dict):
    import contextlib
    import torch
    if job["precision"] != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if _cuda() else "cpu", dtype=torch.bfloat16)


def _timed(fn, job: dict) -> tuple[float, list[float], object]:
    import torch
    times, out = [], None
    for _ in range(job["warmup"] + job["steps"]):
        t0 = time.perf_counter()
        with torch.inference_mode(), _autocast(job):
            out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[job["warmup"]:]), times, out


def forward(job: dict) -> dict:
    import torch
    model = _model(job)
    x = torch.tensor(job["tokens"], device=model.device)
    step_s, times, logits = _timed(lambda: model(x).logits, job)
    return dict(step_s=step_s, first_step_s=times[0], compile_s=None,
                check=logits[0, -1, :8].double().tolist(), peak_dev_gib=_device_peak_gib(), device=_device())


def generate(job: dict) -> dict:
    """Greedy, exactly new_tokens tokens: min_new_tokens = max_new_tokens bans EOS until then."""
    import torch
    model = _model(job)
    x = torch.tensor(job["tokens"], device=model.device)
    n = job["new_tokens"]
    kw = dict(attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n, min_new_tokens=n,
              pad_token_id=model.config.pad_token_id or 0)
    step_s, times, out = _timed(lambda: model.generate(x, **kw), job)
    assert out.shape == (x.shape[0], x.shape[1] + n), out.shape
    return dict(step_s=step_s, first_step_s=times[0], compile_s=None,
                check=out[0, x.shape[1]:x.shape[1] + 16].tolist(), peak_dev_gib=_device_peak_gib(),
                device=_device(), threads=torch.get_num_threads())
