"""Small builders shared by the tests."""


def tiny_model(num_classes=10, domains=("clean", "adv"), **kwargs):
    """A reduced B0 (few channels, one block per stage) for fast tests."""
    from advprop_tf.models import build_efficientnet

    kwargs.setdefault("width_coefficient", 0.25)
    kwargs.setdefault("depth_coefficient", 0.25)
    kwargs.setdefault("resolution", 32)
    return build_efficientnet(
        "efficientnet-b0", num_classes=num_classes, domains=domains, **kwargs
    )
