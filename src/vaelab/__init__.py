"""vaelab: variational autoencoders and Laplace approximations, fast and checked.

Modules: data (MNIST), model (VAE), objectives (ELBO, KL, IWAE), training, evaluation, laplace,
plots, cli. Importing vaelab does no work.
"""

__version__ = "0.1.0"
