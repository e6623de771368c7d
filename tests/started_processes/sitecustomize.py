"""Python runs this at start-up in every process the tests start (conftest.py puts this directory on their
PYTHONPATH): it turns Grappler's graph rewrites off, as conftest.py does in the test processes themselves.
They preserve results and cost seconds on each new graph of a run of a few steps. test_readme.py runs the
README's command without it, as a user does."""

import tensorflow as tf

tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
