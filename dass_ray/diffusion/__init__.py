"""The target-domain DDPM: schedule and reverse step (Eq. 2-5, 7), UNet, EMA, save/load."""
from dass_ray.diffusion.schedule import DDPMSchedule, EpsModel
from dass_ray.diffusion.unet import EMA, build_unet, ddpm_loss, load_unet, load_unet_dir, save_unet

__all__ = ["DDPMSchedule", "EpsModel", "EMA", "build_unet", "ddpm_loss", "load_unet", "load_unet_dir", "save_unet"]
