"""lfm_core: latent flow matching in pure PyTorch + diffusers.

Time convention (the only one in this package): t = 0 is noise, t = 1 is data.
The path is x_t = (1 - t) x0 + t x1 with x0 ~ N(0, I) and x1 a (latent) data point, and the
target velocity is dx_t/dt = x1 - x0. diffusers' flow-matching schedulers use sigma = 1 - t;
`lfm_core.paths.t_to_sigma` / `sigma_to_t` are the one adapter between the two.

Every velocity network is called as ``model(x, t, class_labels=None)`` with x of shape
(B, C, H, W) and t of shape (B,). This package never imports ray, mlflow, boto3 or omegaconf.
"""

__version__ = "0.1.0"
