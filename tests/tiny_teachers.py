"""Tiny teachers of the same classes as the real ones (random weights, built from config, nothing downloaded):
what diffusers' own tests do. Each teacher builder writes a diffusers pipeline folder and returns its path; the
export builders (latent_export, text_export) return a onestep OneStepPipeline, saved where asked."""
import string
from pathlib import Path

import torch


def tiny_unet(sample_size=8, channels=1, num_classes=10, seed=0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels,
                       block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       num_class_embeds=num_classes)


def char_tokenizer(max_length=16):
    """A character-level CLIP tokenizer (real CLIPTokenizer class, tiny vocabulary): distinct prompts differ."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + string.punctuation:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _clip(with_projection=False, hidden=32, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=160, hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=2, max_position_embeddings=16, projection_dim=hidden,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _vae(latent_channels=4, seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=16)


def pixel_ddpm(path: Path) -> str:
    """google/ddpm-cifar10-32's classes: unconditional UNet2DModel, DDPM linear betas, epsilon (3x8x8 here)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    DDPMPipeline(unet=tiny_unet(channels=3, num_classes=None), scheduler=DDPMScheduler()).save_pretrained(path)
    return str(path)


def stable_diffusion(path: Path, prediction_type="epsilon") -> str:
    """SD1.5 / SD2.1's classes: UNet2DConditionModel + AutoencoderKL + CLIPTextModel (16x16 images, 8x8 latents)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, clip_sample=False, steps_offset=1)
    StableDiffusionPipeline(vae=_vae(), text_encoder=_clip(), tokenizer=char_tokenizer(), unet=unet,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    return str(path)


def stable_diffusion_3(path: Path) -> str:
    """SD3's classes: SD3Transformer2DModel (flow matching, shift 3) + AutoencoderKL + two CLIP encoders; the
    optional T5 encoder is left out, as SD3 allows."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=64)
    StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                             vae=_vae(), text_encoder=_clip(True, seed=1), tokenizer=char_tokenizer(),
                             text_encoder_2=_clip(True, seed=2), tokenizer_2=char_tokenizer(),
                             text_encoder_3=None, tokenizer_3=None).save_pretrained(path)
    return str(path)


def latent_export(path: Path | None = None):
    """An unconditional latent onestep export: a 4-channel UNet2DModel on 8x8 latents + a tiny AutoencoderKL (16x16
    images); saved to `path` if given, returned as a OneStepPipeline."""
    from diffusers import DDPMScheduler, UNet2DModel

    from onestep.pipelines import OneStepPipeline

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pipe = OneStepPipeline(scheduler=scheduler, unet=unet, vae=_vae())
    pipe.card = {"teacher": "tiny-latent"}
    if path is not None:
        pipe.save_pretrained(path)
    return pipe


def text_export(tmp: Path, path: Path | None = None):
    """A text-to-image onestep export of the tiny SD-class teacher (UNet2DConditionModel + VAE + CLIP text encoder,
    prompts encoded through StableDiffusionPipeline.encode_prompt); the teacher is written under `tmp`."""
    from diffusers import StableDiffusionPipeline

    from onestep.pipelines import OneStepPipeline

    sd = StableDiffusionPipeline.from_pretrained(stable_diffusion(tmp / "sd_teacher"))
    pipe = OneStepPipeline(scheduler=sd.scheduler, unet=sd.unet, vae=sd.vae, text_encoder=sd.text_encoder,
                           tokenizer=sd.tokenizer, prompt_pipeline="StableDiffusionPipeline")
    pipe.card = {"teacher": "tiny-sd"}
    if path is not None:
        pipe.save_pretrained(path)
    return pipe


def prompts_file(path: Path) -> str:
    path.write_text("a red circle\na blue square\n# comments are skipped\na green triangle\na small dog\n")
    return str(path)
