"""Thresholds with a name each, shared by evaluation, the loader, the pages and the probe: one
meaning per word.

- *dense*: a latent firing on more than DENSE_THRESHOLD of the tokens (evaluation's
  `dense_fraction`, the SAE page's dense count and filter);
- *frequent*: a latent firing on more than FREQUENT_THRESHOLD of the tokens; the probe lists such
  latents apart and leaves them out of its shading and ranking, since they say little about one
  text (Neuronpedia hides "dense" features above 1 % the same way);
- an explanation whose held-out F1 is below WEAK_F1 is shown dimmed.
"""

DENSE_THRESHOLD = 0.1
FREQUENT_THRESHOLD = 0.01
WEAK_F1 = 0.1
