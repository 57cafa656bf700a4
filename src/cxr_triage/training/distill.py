"""Knowledge distillation: a frozen teacher (one or several networks, mean of their softened probabilities) scores
every training batch as the student sees it, augmentations included, and the student also learns those scores.

A teacher member is a cxr-triage checkpoint (``best.pt`` or a Lightning ``.ckpt``) or an exported whole-image
bundle directory (scored through onnxruntime: the shipped bundle has no PyTorch checkpoint). Members see the
student's own input tensor, so they must take the same input size; their border trim may differ a little from the
student's (they were trained on random crops).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from cxr_triage.training.model import CheckpointError, load_checkpoint


class Teacher:
    """Frozen members; ``probs(x, T)`` = mean over members of softmax(logits / T). Not an ``nn.Module`` on purpose:
    it is not trained, not checkpointed and not exported with the student."""

    def __init__(self, members: list[str], size: int) -> None:
        if not members:
            raise ValueError("distill.teachers: name at least one checkpoint or bundle")
        self.torch_members: list[torch.nn.Module] = []
        self.onnx_members: list = []
        for m in members:
            if Path(m).is_dir():
                from cxr_triage.runtime.engine import Engine

                engine = Engine(Path(m))
                spec = engine.spec
                self.onnx_members.append(engine)
            else:
                model, _, spec = load_checkpoint(Path(m))
                model.requires_grad_(False)
                self.torch_members.append(model.eval().to(memory_format=torch.channels_last))
            if spec.lungs != "none" or spec.size != size:
                raise CheckpointError(f"{m}: a teacher must be a whole-image network at {size} px")

    @torch.no_grad()
    def probs(self, x: torch.Tensor, temperature: float) -> torch.Tensor:
        outs = [net(x.contiguous(memory_format=torch.channels_last)).float() for net in self.torch_members]
        if self.onnx_members:
            arr = x.detach().float().cpu().numpy()
            outs += [torch.from_numpy(e.forward(arr)[0]).to(x.device) for e in self.onnx_members]
        return torch.stack([F.softmax(o / temperature, dim=1) for o in outs]).mean(0)


def distill_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) at ``temperature``, times T^2 (Hinton et al. 2015) so its gradients keep their scale."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(log_p, teacher_probs, reduction="batchmean") * temperature**2


def agreement(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> float:
    """Share of the batch where student and teacher pick the same class (logged while training)."""
    return (student_logits.argmax(1) == teacher_probs.argmax(1)).float().mean().item()
