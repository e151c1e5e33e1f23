"""Evaluate a trained sequence run over a whole split and write its report.

Every window of the split is scored (no single-batch numbers); workers accumulate sums and
per-window terms that are combined exactly (``metrics.EvalAccumulator``). The report page shows the
metrics against the trivial floors, the loss curves of the run and the autoencoder runs it started
from, and sample predictions.
"""

from __future__ import annotations

import datetime as _dt
import logging

import torch

from storymm import storage
from storymm.config import config_from_dict
from storymm.data.loader import PreparedDataset
from storymm.errors import StorymmError
from storymm.evaluation.metrics import EvalAccumulator, median_image
from storymm.evaluation.report import verdict_line, write_report
from storymm.inference import checkpoint_state, inference_model, predict_batch, require_sequence_run
from storymm.progress import Progress
from storymm.training.losses import text_cross_entropy_sum
from storymm.training.run import RunFolder
from storymm.training.runtime import Runtime
from storymm.training.stages import TokenizerInfo, window_loader

log = logging.getLogger(__name__)


def load_sequence_model(run_uri: str, tokens: TokenizerInfo, which: str = "latest"):
    """The run's record (``run.json``), its config and sequence model from the ``latest`` (or
    ``best``, by validation loss) checkpoint (eval mode, on CPU), and the checkpoint step."""
    folder = RunFolder(run_uri)
    run = folder.read_record()
    require_sequence_run(folder, run, "evaluate")
    config = config_from_dict(run["config"])
    state = checkpoint_state(folder, which, purpose="evaluating")
    return run, config, inference_model(config, tokens, state["model"]), int(state["step"])


def _median_of_train_targets(dataset: PreparedDataset, config, limit: int) -> torch.Tensor:
    loader = window_loader(
        dataset, "train", config, batch_size=256, tags=False, shuffle=True, seed=config.seed, equalize=False
    )

    def targets():
        seen = 0
        for batch in loader:
            yield batch["target_frame"]
            seen += len(batch["target_frame"])
            if seen >= limit:
                return

    return median_image(targets(), max_samples=limit, seed=config.seed)


def shared_space(model) -> str | None:
    """Where the predicted visual and text latents can be compared (cross-modal similarity,
    retrieval): ``"latents"`` when they have one size (as ``loss.cross_modal_infonce`` trains them),
    ``"fusion"`` when they differ but the fusion projects both into one space (``gate``), else
    ``None``: the metrics are not applicable and reported as null with a note."""
    if model.visual.latent_dim == model.text.latent_dim:
        return "latents"
    fusion = model.fusion
    if hasattr(fusion, "proj_v") and hasattr(fusion, "proj_t"):
        return "fusion"
    return None


def _shared_latents(model, space: str | None, out: dict):
    if space == "latents":
        return out["visual_latent"], out["text_latent"]
    if space == "fusion":
        return model.fusion.proj_v(out["visual_latent"]), model.fusion.proj_t(out["text_latent"])
    return None, None


_SPACE_NOTES = {
    "latents": "cosine of the predicted visual and text latents",
    "fusion": "latent sizes differ: cosine after the fusion's projections of both latents to its shared space",
    None: "not applicable: the latent sizes differ and the model has no shared space (fusion without projections)",
}


def _text_copy_floors(model, batch: dict, labels, pad_id: int, tokenizer) -> dict:
    """Text floors of one batch: the target cross-entropy with the decoder conditioned on the
    encoded last / two-back input sentence, and those sentences themselves (for BLEU)."""
    out = {}
    k = batch["tokens"].shape[1]
    for name, back in (("copy_last", 1), ("copy_two_back", 2)):
        if back > k:
            continue
        sentence = batch["tokens"][:, -back]
        ce, _ = text_cross_entropy_sum(
            model.text_logits(model.text.encode(sentence), batch["target_tokens"]), labels, pad_id
        )
        out[f"text_ce_sum_{name}"] = float(ce)
        out[f"{name}_sentences"] = [tokenizer.decode(row.tolist()) for row in sentence.cpu()]
    return out


@torch.no_grad()
def evaluate(
    run_uri: str,
    data_uri: str,
    split: str,
    out_uri: str | None,
    runtime: Runtime | None = None,
    progress: bool = True,
    temperature: float | None = None,
    top_p: float | None = None,
    checkpoint_name: str = "latest",
) -> dict:
    """Score the run's ``latest`` (or ``best``) checkpoint on ``split``; write the report under
    ``out_uri`` (rank 0)."""
    runtime = runtime or Runtime.from_environment()
    dataset = PreparedDataset(data_uri)
    tokens = TokenizerInfo.from_manifest(dataset.manifest)
    run, config, model, step = load_sequence_model(run_uri, tokens, checkpoint_name)
    space = shared_space(model)
    model.to(runtime.device)
    tokenizer = dataset.tokenizer
    temperature = config.eval.temperature if temperature is None else temperature
    top_p = config.eval.top_p if top_p is None else top_p
    generator = torch.Generator(device=runtime.device).manual_seed(config.seed)

    floor_image = _median_of_train_targets(dataset, config, config.eval.median_windows)
    accumulator = EvalAccumulator(floor_image)
    loader = window_loader(
        dataset,
        split,
        config,
        batch_size=config.eval.batch_size,
        rank=runtime.rank,
        world_size=runtime.world_size,
        shuffle=False,
        equalize=False,
        with_text=True,
    )
    samples: list[dict] = []
    bar = Progress(len(loader), desc=f"evaluate {split}", unit="batch", enabled=progress and runtime.is_main)
    for batch in loader:
        batch = runtime.to_device(batch)
        predicted = predict_batch(
            model, batch, config.data.max_tokens, temperature=temperature, top_p=top_p, generator=generator
        )
        out = predicted.outputs
        labels = batch["target_tokens"][:, 1:]
        ce_true, count = text_cross_entropy_sum(out["text_logits"], labels, tokens.pad_id)
        shuffled = torch.roll(torch.arange(len(labels), device=labels.device), 1)
        ce_shuffled, _ = text_cross_entropy_sum(
            model.text_logits(out["text_latent"][shuffled], batch["target_tokens"]), labels, tokens.pad_id
        )
        hypotheses = [tokenizer.decode(row.tolist()) for row in predicted.tokens.cpu()]
        references = [tokenizer.decode(row.tolist()) for row in batch["target_tokens"].cpu()]
        copy_floors = _text_copy_floors(model, batch, labels, tokens.pad_id, tokenizer)
        prediction = predicted.image
        visual_latent, text_latent = _shared_latents(model, space, out)
        accumulator.update(
            pred_image=prediction.cpu(),
            target_image=batch["target_frame"].cpu(),
            last_input=batch["frames"][:, -1].cpu(),
            inputs=batch["frames"].cpu(),
            text_ce_sum_true=float(ce_true),
            text_ce_sum_shuffled=float(ce_shuffled),
            text_tokens=int(count),
            visual_latent=None if visual_latent is None else visual_latent.cpu(),
            text_latent=None if text_latent is None else text_latent.cpu(),
            hypotheses=hypotheses,
            references=references,
            **copy_floors,
        )
        for i in range(min(len(hypotheses), config.eval.samples - len(samples))):
            samples.append(
                {
                    "inputs": batch["frames"][i].cpu(),
                    "target": batch["target_frame"][i].cpu(),
                    "prediction": prediction[i].cpu(),
                    "input_sentences": batch["input_sentences"][i],
                    "target_sentence": batch["target_sentences"][i],
                    "generated_sentence": hypotheses[i],
                }
            )
        bar.update(1)
    bar.close()

    states = runtime.all_gather_object(accumulator.state())
    if not runtime.is_main:
        return {}
    combined = EvalAccumulator.from_states(states)
    result = combined.compute()
    report = {
        "run": storage.redact(run_uri),
        "data": storage.redact(data_uri),
        "split": split,
        "step": step,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "model": {
            "fusion": config.model.fusion,
            "copy_path": config.model.copy_path,
            "image_head": config.model.image_head,
            "visual_latent": config.model.visual_latent,
            "text_latent": config.model.text_latent,
        },
        "generation": {"temperature": temperature, "top_p": top_p},
        "checkpoint": checkpoint_name,
        **result,
        "notes": {"cross_modal_similarity": _SPACE_NOTES[space]},
    }
    report["verdict"] = verdict_line(report)
    if out_uri is not None:
        history = {"sequence": RunFolder(run_uri).read_metrics()}
        for parent in run.get("init_from", []):
            try:
                history[RunFolder(parent).stage] = RunFolder(parent).read_metrics()
            except Exception as err:  # a moved parent run only costs its curve
                log.warning("no loss curve for %s: %s", storage.redact(parent), err)
        write_report(
            report,
            out_uri,
            metrics_history=history,
            samples=samples,
            title=f"storymm evaluation: {config.model.fusion} on {split}",
        )
        try:
            RunFolder(run_uri).record_report(
                out_uri, split=split, step=step, checkpoint=checkpoint_name, created=report["created"]
            )
        except (StorymmError, OSError) as err:  # a read-only run folder: the report itself is written
            log.warning("the report is written, but %s could not note it: %s", storage.redact(run_uri), err)
    return report


def format_summary(report: dict) -> str:
    m, f = report["metrics"], report["floors"]

    def num(value):
        return "n/a" if value is None else f"{value:.4f}"

    return "\n".join(
        [
            f"{report['split']}: {report['windows']} windows, step {report['step']}",
            f"  image L1 {num(m['image_l1'])} (median floor {num(f['median_image_l1'])}, "
            f"copy-last {num(f['copy_last_l1'])}, copy-two-back {num(f.get('copy_two_back_l1'))}, "
            f"mean-of-inputs {num(f.get('mean_of_inputs_l1'))}, "
            f"best-input oracle {num(f.get('best_input_oracle_l1'))}), "
            f"MSE {num(m['image_mse'])}, SSIM {num(m['ssim'])}, PSNR {num(m['psnr'])}, "
            f"spread {num(m['prediction_spread'])}",
            f"  text CE {num(m['text_ce_true'])} (shuffled {num(m['text_ce_shuffled'])}, "
            f"copy-two-back {num(f.get('text_ce_copy_two_back'))}), perplexity {num(m['perplexity'])}, "
            f"BLEU {num(m['bleu'])} (copy-two-back {num(f.get('bleu_copy_two_back'))})",
            f"  cross-modal {num(m['cross_modal_similarity'])}, retrieval R@1 {num(m['retrieval_r1'])} "
            f"(chance {num(f.get('retrieval_r1_chance'))}) R@10 {num(m['retrieval_r10'])} "
            f"(chance {num(f.get('retrieval_r10_chance'))})",
            *([f"  {report['verdict']}"] if report.get("verdict") else []),
        ]
    )
