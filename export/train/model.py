"""The model side of training: a small LLaVA from transformers' own classes, its loss through the
export's PipmmVision, and batched greedy decoding for fast evaluation on a GPU.

    pixel_values [S,3,H,W] --PipmmVision (T-CLS from the prompt MLP, or CLIP's class embedding)--> [Q,K,D]
    input_ids [Q,T] --embed--> [Q,T,D], image slots := visual tokens
    --language_model--> hidden [Q,T,D] --lm_head at answer positions--> cross-entropy

Same modules as the export (export.model.vision.PipmmVision, the checkpoint's language model and
lm_head), so what is trained is what is exported.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from export.model.prompt import PromptMLP
from export.model.reducers import top_patches
from export.train.data import IGNORE
from export.train.locate import locate_loss
from export.model.vision import PipmmVision, vision_config_from


@dataclass
class ModelSizes:
    image_size: int = 224
    patch_size: int = 14
    vision_hidden: int = 192
    vision_layers: int = 6
    vision_heads: int = 3
    vision_mlp: int = 576
    text_hidden: int = 256
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_mlp: int = 512
    vocab_size: int = 512
    max_positions: int = 512
    vision_feature_layer: int = -1  # every ViT layer is used (LLaVA-1.5 uses -2 of 24)

    @classmethod
    def tiny(cls) -> "ModelSizes":
        """For tests and CPU smoke runs."""
        return cls(image_size=112, patch_size=14, vision_hidden=32, vision_layers=2, vision_heads=2, vision_mlp=64,
                   text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, text_mlp=128, vocab_size=320)

    def to_dict(self) -> dict:
        return asdict(self)


def special_tokens(tokenizer) -> dict:
    """The ids the manifest will carry (export.writer._special_tokens), from the trained tokenizer."""
    from export.synthetic import SPECIAL_TOKENS

    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    return {"bos": ids["<s>"], "eos": [ids["</s>"]], "pad": ids["<pad>"], "image": ids["<image>"],
            "texts": sorted(SPECIAL_TOKENS)}


def build_llava(sizes: ModelSizes, tokenizer, seed: int = 0):
    """A randomly initialised LlavaForConditionalGeneration: CLIP ViT (class token) + projector + Llama (GQA)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    special = special_tokens(tokenizer)
    vision = CLIPVisionConfig(hidden_size=sizes.vision_hidden, intermediate_size=sizes.vision_mlp,
                              num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.vision_heads,
                              image_size=sizes.image_size, patch_size=sizes.patch_size,
                              projection_dim=sizes.vision_hidden)
    text = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=sizes.text_hidden,
                       intermediate_size=sizes.text_mlp, num_hidden_layers=sizes.text_layers,
                       num_attention_heads=sizes.text_heads, num_key_value_heads=sizes.text_kv_heads,
                       max_position_embeddings=sizes.max_positions, bos_token_id=special["bos"],
                       eos_token_id=special["eos"][0], pad_token_id=special["pad"], tie_word_embeddings=False)
    grid = sizes.image_size // sizes.patch_size
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=special["image"],
                         vision_feature_layer=sizes.vision_feature_layer, vision_feature_select_strategy="default",
                         image_seq_length=grid * grid)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = special["bos"], special["eos"][0], special["pad"]
    return model


def parameter_counts(model, prompt_mlp: PromptMLP | None = None) -> dict:
    inner = model.model
    counts = {
        "vision_tower": sum(p.numel() for p in inner.vision_tower.parameters()),
        "projector": sum(p.numel() for p in inner.multi_modal_projector.parameters()),
        "language_model": sum(p.numel() for p in inner.language_model.parameters()),
        "lm_head": sum(p.numel() for p in model.lm_head.parameters()),
    }
    if prompt_mlp is not None:
        counts["prompt_mlp"] = sum(p.numel() for p in prompt_mlp.parameters())
    counts["total"] = sum(counts.values())
    return counts


def make_vision(model, budget="full", reducer="pool", prompt_mlp: PromptMLP | None = None) -> PipmmVision:
    config = vision_config_from(model.config, budget=budget, reducer=reducer)
    return PipmmVision(model.model.vision_tower, model.model.multi_modal_projector, config, prompt_mlp)


def encode_prompts(model, encoder_ids: torch.Tensor, lengths: torch.Tensor, layer: int = -1,
                   pooling: str = "last") -> torch.Tensor:
    """PIP-MM's prompt vectors [Q,D] from right-padded encoder ids [Q,Te] (lengths [Q]).

    As the SDK computes them (Pipeline.encode_prompt over the decoder graph): positions 0..len-1,
    layer -1 = last hidden state after the final norm, k = output of decoder layer k; the last
    real token, or the mean over the real tokens.
    """
    lm = model.model.language_model
    out = lm(inputs_embeds=model.get_input_embeddings()(encoder_ids), use_cache=False,
             output_hidden_states=layer != -1)
    hidden = out.last_hidden_state if layer == -1 else out.hidden_states[layer + 1]  # [Q,Te,D]
    if pooling == "mean":
        mask = (torch.arange(encoder_ids.shape[1], device=lengths.device)[None] < lengths[:, None]).to(hidden.dtype)
        return (hidden * mask.unsqueeze(-1)).sum(1) / lengths[:, None].to(hidden.dtype)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]


def visual_tokens(model, vision: PipmmVision, batch: dict, frozen_llm_for_prompt: bool = True):
    """-> (visual tokens [Q,K,D], cls_attention [Q,N]) for every question of the batch."""
    pixels, index = batch["pixel_values"], batch["scene_index"]
    if vision.prompt_mlp is None:  # prompt-agnostic: one ViT pass per scene, shared by its questions
        tokens, attention = vision(pixels, None)[:2]  # (kept_patches after them, for prompt-topk)
        return tokens[index], attention[index]
    mlp_cfg = vision.prompt_mlp.config
    with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen_llm_for_prompt):
        vectors = encode_prompts(model, batch["encoder_ids"], batch["encoder_lengths"], mlp_cfg.prompt_layer,
                                 mlp_cfg.pooling)
    return vision(pixels[index], vectors.float() if vectors.dtype != pixels.dtype else vectors)[:2]


def embed_sequence(model, input_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Token embeddings [Q,T,D] with the image slots replaced, row by row, by the visual tokens [Q,K,D]."""
    embeds = model.get_input_embeddings()(input_ids)
    slots = input_ids == model.config.image_token_index  # [Q,T], K per row
    return embeds.masked_scatter(slots.unsqueeze(-1), tokens.to(embeds.dtype))


def _balanced_ce(logits: torch.Tensor, target: torch.Tensor, background_weight: float) -> torch.Tensor:
    """Mean cross-entropy over targets > 0 plus background_weight * the mean over targets == 0."""
    per = F.cross_entropy(logits, target, reduction="none")
    fore = target > 0
    loss = per[fore].mean() if fore.any() else per.new_zeros(())
    return loss + background_weight * per[~fore].mean()


def aux_head_outputs(grid: int) -> int:
    from export.train.data import CHAR_CLASSES, CHAR_SLOTS, PATCH_CLASSES

    return len(PATCH_CLASSES) + CHAR_SLOTS * len(CHAR_CLASSES) + 2 * grid


def aux_patch_loss(head: torch.nn.Module, scene_tokens: torch.Tensor, objects: torch.Tensor, chars: torch.Tensor,
                   background_weight: float = 0.1) -> torch.Tensor:
    """Stage 0's auxiliary dense loss on the full-budget visual tokens [S,N,D]: classify every token
    into data.PATCH_CLASSES (objects [S,N]: which object, if any, has its centre there) and
    its CHAR_SLOTS label-character slots (chars [S,N,3]), and every token into its own grid row and
    column (so a token says where it is, also once a reducer has dropped its neighbours).

    Object patches are ~3% of all and character patches fewer: the foreground mean cross-entropy and
    the background's are averaged with weights 1 and background_weight, so the rare ones count.
    """
    from export.train.data import PATCH_CLASSES

    s, n, _ = scene_tokens.shape
    grid = math.isqrt(n)
    logits = head(scene_tokens).float().flatten(0, 1)  # [S*N, 97 + 3*31 + 2*grid]
    n_obj, slots = len(PATCH_CLASSES), chars.shape[-1]
    n_char = logits.shape[1] - n_obj - 2 * grid
    loss = _balanced_ce(logits[:, :n_obj], objects.flatten(), background_weight)
    char_logits = logits[:, n_obj:n_obj + n_char].reshape(s * n * slots, -1)  # [S*N*3, 31]
    loss = loss + _balanced_ce(char_logits, chars.flatten(), background_weight)
    place = torch.arange(n, device=logits.device).repeat(s)  # [S*N] patch index, raster order
    rows, cols = logits[:, n_obj + n_char:n_obj + n_char + grid], logits[:, n_obj + n_char + grid:]
    return loss + F.cross_entropy(rows, place // grid) + F.cross_entropy(cols, place % grid)


def sample_keep(grounding: torch.Tensor, attention: torch.Tensor, fraction: float, budgets: tuple[int, ...],
                generator: torch.Generator | None = None) -> torch.Tensor:
    """[Q,N] bool: the visual tokens each question keeps when stage 0 trains on reduced sets.

    A `fraction` of the questions keep K tokens (K drawn from `budgets`): the K patches the class
    token attends to most (attention [Q,N], as prompt-topk keeps them), and for half of those rows
    every patch of the objects the question is about (grounding [Q,N]) first, as an ideal
    prompt-aware reducer would; the other questions keep all N. The kept tokens bunch up where the
    class token looks, so a token's index in the sequence no longer tells its place in the image:
    the language model must read positions from the tokens themselves, as behind prompt-topk.
    """
    q, n = grounding.shape
    device = grounding.device
    reduce = torch.rand(q, device=device, generator=generator) < fraction
    force = torch.rand(q, device=device, generator=generator) < 0.5
    k = torch.tensor(budgets, device=device)[torch.randint(len(budgets), (q,), device=device, generator=generator)]
    score = attention.detach().float() / attention.detach().float().amax(1, keepdim=True).clamp_min(1e-9)  # [0,1]
    score = score + 2.0 * (grounding & force[:, None]).float()
    rank = score.argsort(dim=1, descending=True).argsort(dim=1)  # [Q,N] rank of each patch
    keep = rank < k[:, None]
    return torch.where(reduce[:, None], keep, torch.ones_like(keep))


def patch_position_ids(input_ids: torch.Tensor, image_token: int, attention: torch.Tensor, k: int) -> torch.Tensor:
    """[Q,T] decoder positions with the K kept visual tokens at their patch positions, as the SDK
    builds them for a bundle with visual_tokens.positions == "patch" (sdk.pipeline.prefill_positions):
    prompt-topk keeps the K patches of largest attention [Q,N] in raster order; the text after the
    image moves to its full-budget place (+ N - K). Right-padded rows: pads get positions too, unread."""
    kept = top_patches(attention.float(), k)  # [Q,K], prompt-topk's own selection (ties included)
    return kept_position_ids(input_ids, image_token, kept[:, None], attention.shape[-1])


def kept_position_ids(input_ids: torch.Tensor, image_token: int, kept: torch.Tensor, n: int) -> torch.Tensor:
    """[Q,T] decoder positions of F images a row, their kept patch indices kept [Q,F,K] (raster order), as
    sdk.pipeline.prefill_positions lays them out: image f's K slots (contiguous) at its first slot's place + their
    patch index, and every token after image f moved on by N - K, i.e. each image its own block of N positions."""
    q, t = input_ids.shape
    f, k = kept.shape[1:]
    slots = input_ids == image_token  # [Q,T], F*K per row
    before = slots.long().cumsum(1) - slots.long()  # image slots before each token
    image, j = before // k, before % k  # text: images wholly before it; a slot: its image and its index there
    places = torch.arange(t, device=input_ids.device)[None] + image * (n - k)
    patch = kept.flatten(1).long().gather(1, before.clamp_max(f * k - 1))  # [Q,T], read at the slots only
    return torch.where(slots, places - j + patch, places)


def packed_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """[S,1,L,L] bool (True = attend) for packed rows (data.pack_scene), segments [S,L]: 0 = the shared prefix,
    i > 0 = question i, -1 = pad. Causal, and a token of question i reads the prefix and question i only; a pad
    reads the prefix and itself (never scored, but a row of all False would give NaN). transformers passes a 4-D
    mask through unchanged (masking_utils: "already 4D ... return as-is") to SDPA, where True means attend."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    same = (segments[:, :, None] == segments[:, None, :]) | (segments[:, None, :] == 0)  # [S,L(query),L(key)]
    return (same & causal).unsqueeze(1)


def _packed_lm_loss(model, batch: dict, scene_tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Answer cross-entropy of packed rows (one a scene, data.pack_scene) -> (mean loss, answer tokens)."""
    embeds = embed_sequence(model, batch["packed_ids"], scene_tokens)  # [S,L,D], one image a row
    hidden = model.model.language_model(inputs_embeds=embeds, use_cache=False, position_ids=batch["packed_positions"],
                                        attention_mask=packed_attention_mask(batch["packed_segments"])).last_hidden_state
    targets = batch["packed_targets"]
    keep = targets != IGNORE  # position t predicts targets[t], its segment's next token
    return F.cross_entropy(model.lm_head(hidden[keep]).float(), targets[keep]), int(keep.sum())


def forward_loss(model, vision: PipmmVision, batch: dict, grounding_weight: float = 0.0,
                 frozen_llm_for_prompt: bool = True, aux_head: torch.nn.Module | None = None,
                 aux_weight: float = 0.0, reduced: tuple | None = None, patch_positions: bool = False,
                 locate: tuple | None = None) -> dict:
    """Next-token cross-entropy on the answer tokens (+ EOS); optionally the grounding term:
    -log(attention mass T-CLS puts on the patches of the objects the question names), and (stage 0)
    the auxiliary patch-classification term of aux_patch_loss on the full-budget visual tokens, and
    (stage 0, reduced = (fraction, budgets, generator)) answers from reduced sets (sample_keep). A packed batch
    (data.pack_scene: stage 0, the plain model at full budget) runs the language model once a scene.
    locate = (head, layer, weight): the locate term of export/train/locate.py on hidden state `layer`."""
    aux = None
    if "packed_ids" in batch:
        if vision.prompt_mlp is not None or reduced is not None or patch_positions or grounding_weight > 0 or locate:
            raise ValueError("packed questions are a stage-0 setting: the plain model, all visual tokens")
        scene_tokens = vision(batch["pixel_values"], None)[0]  # [S,N,D]
        lm_loss, answers = _packed_lm_loss(model, batch, scene_tokens)
        out = {"lm_loss": lm_loss, "answer_tokens": answers, "loss": lm_loss}
        if aux_head is not None and aux_weight > 0:
            out["aux_loss"] = aux_patch_loss(aux_head, scene_tokens, batch["patch_classes"], batch["patch_chars"])
            out["loss"] = lm_loss + aux_weight * out["aux_loss"]
        return out
    if aux_head is not None and aux_weight > 0:
        if vision.prompt_mlp is not None or vision.config.num_tokens != vision.config.grid ** 2:
            raise ValueError("the auxiliary patch loss needs the plain model at full budget (stage 0)")
        scene_tokens, scene_attention = vision(batch["pixel_values"], None)  # [S,N,D], one pass per scene
        index = batch["scene_index"]
        tokens, attention = scene_tokens[index], scene_attention[index]
        aux = aux_patch_loss(aux_head, scene_tokens, batch["patch_classes"], batch["patch_chars"])
    if reduced is not None:
        if aux is None:
            raise ValueError("reduced visual sets are a stage-0 setting (with the auxiliary loss)")
        batch = {**batch, "keep": sample_keep(batch["grounding"], attention, *reduced)}
    else:
        tokens, attention = visual_tokens(model, vision, batch, frozen_llm_for_prompt)
    embeds = embed_sequence(model, batch["input_ids"], tokens)
    lm_kwargs = {}
    if patch_positions:
        # The explicit all-ones mask matters: given position ids with jumps and no mask (and no cache),
        # transformers reads the jumps as packed-sequence boundaries (masking_utils.
        # find_packed_sequence_indices) and the text after the image could not attend to it. Pads sit
        # after the answer, so causal attention never reads them for a scored token.
        lm_kwargs = {"position_ids": patch_position_ids(batch["input_ids"], model.config.image_token_index,
                                                        attention, tokens.shape[1]),
                     "attention_mask": torch.ones_like(batch["input_ids"])}
    elif batch.get("keep") is not None:  # reduced visual sets (sample_keep): hide the dropped slots, close the gaps
        slots = batch["input_ids"] == model.config.image_token_index  # [Q,T], N per row
        attend = torch.ones_like(slots)
        attend[slots] = batch["keep"].flatten()
        lm_kwargs = {"attention_mask": attend.long(), "position_ids": (attend.long().cumsum(1) - 1).clamp_min(0)}
    lm_out = model.model.language_model(inputs_embeds=embeds, use_cache=False, output_hidden_states=bool(locate),
                                        **lm_kwargs)
    hidden = lm_out.last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE  # predict token t+1 from position t; only answer tokens
    logits = model.lm_head(hidden[:, :-1][keep]).float()
    lm_loss = F.cross_entropy(logits, targets[keep])
    out = {"lm_loss": lm_loss, "answer_tokens": int(keep.sum())}
    loss = lm_loss
    if aux is not None:
        out["aux_loss"] = aux
        loss = loss + aux_weight * aux
    if locate:
        head, layer, weight = locate
        out["locate_loss"] = locate_loss(head, lm_out.hidden_states[layer], batch["labels"], batch["locate"],
                                         batch["locate_present"])
        loss = loss + weight * out["locate_loss"]
    if grounding_weight > 0:
        mask = batch["grounding"]
        rows = mask.any(-1)
        mass = (attention.float() * mask).sum(-1)[rows]
        grounding = -torch.log(mass.clamp_min(1e-6)).mean() if rows.any() else lm_loss.new_zeros(())
        out["grounding_loss"] = grounding
        loss = loss + grounding_weight * grounding
    out["loss"] = loss
    return out


@torch.no_grad()
def greedy_generate(model, vision: PipmmVision, batch: dict, max_new_tokens: int = 64,
                    patch_positions: bool = False, tokens: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None) -> list[list[int]]:
    """Greedy answers for every question of a batch (labels are ignored; ids stop at the prompt).

    Rows are right-padded: prefill the whole [Q,T], read each row's logits at its own last prompt
    token, then decode with a 2-D attention mask that hides each row's pads and position ids that
    continue each row's own positions, i.e. exactly the unpadded sequence the SDK would run.
    """
    from transformers.cache_utils import DynamicCache

    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
    ids, labels = batch["input_ids"], batch["labels"]
    # The prompt is everything before the first label (labels mark answer + EOS).
    is_answer = labels != IGNORE
    lengths = torch.where(is_answer.any(1), is_answer.int().argmax(1), (ids != model.config.text_config.pad_token_id).sum(1))
    width = int(lengths.max())
    ids = ids[:, :width]
    q = ids.shape[0]
    # tokens given: the image slots' tokens [Q,L,D], position_ids their prefill positions [Q,T] (several frames,
    # export/train/multiframe.py)
    if tokens is None:
        tokens, attention = visual_tokens(model, vision, batch)
    embeds = embed_sequence(model, ids, tokens)
    lm = model.model.language_model
    cache = DynamicCache(config=model.config.text_config)
    positions = torch.arange(width, device=ids.device).expand(q, width)
    if patch_positions:
        positions = patch_position_ids(ids, model.config.image_token_index, attention, tokens.shape[1])
    if position_ids is not None:
        positions = position_ids[:, :width]
    hidden = lm(inputs_embeds=embeds, position_ids=positions, past_key_values=cache, use_cache=True).last_hidden_state
    rows = torch.arange(q, device=ids.device)
    following = positions[rows, lengths - 1] + 1  # patch positions run ahead of the cache by N - K an image
    logits = model.lm_head(hidden[rows, lengths - 1])
    mask = (torch.arange(width, device=ids.device)[None] < lengths[:, None]).long()  # [Q,width]
    out = [[] for _ in range(q)]
    done = torch.zeros(q, dtype=torch.bool, device=ids.device)
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)  # [Q]
        for r in (~done).nonzero().flatten().tolist():
            token = int(nxt[r])
            if token in eos:
                done[r] = True
            else:
                out[r].append(token)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(q, 1, dtype=mask.dtype, device=mask.device)], 1)
        pos = (following + step)[:, None]
        hidden = lm(inputs_embeds=model.get_input_embeddings()(nxt[:, None]), attention_mask=mask, position_ids=pos,
                    past_key_values=cache, use_cache=True).last_hidden_state
        logits = model.lm_head(hidden[:, -1])
    return out
