"""Input data: the built-in digits, preprocessing and the tf.data pipeline."""
