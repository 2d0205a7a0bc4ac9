"""Drop-in use of the ``mugv`` ops inside other libraries' models.

One submodule per library, imported explicitly (importing this package imports none of
them, so ``mugv_kernels`` never needs the library):

- :mod:`mugv_kernels.integrations.diffusers`: ``apply_mugv_kernels(model)`` /
  ``remove_mugv_kernels(model)`` for diffusers' Wan 2.1 / 2.2 and HunyuanVideo
  transformers and the Wan VAE.
"""
