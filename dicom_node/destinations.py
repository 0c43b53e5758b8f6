"""A configured destination (``[destination]`` or a route, worker.settings.Destination) as the
sender for its type: :class:`dicom_node.sender.Destination` (C-STORE) or
:class:`dicom_node.dicomweb.WebDestination` (STOW-RS). Both are ResultDestinations: ``store``,
``probe``, and ``ae_title``/``host``/``port`` naming them."""

from __future__ import annotations

from dicom_node.sender import Destination, ResultDestination


def open_destination(d) -> ResultDestination:
    """``d``: a settings Destination (``type``, ``ae_title``, ``host``, ``port``, ``url``,
    ``token``, ``tls``). Its TLS files are read here: a missing one fails now, naming it."""
    if getattr(d, "type", "dimse") == "dicomweb":
        from dicom_node.dicomweb import WebDestination

        return WebDestination(url=d.url, ae_title=d.ae_title, token=d.token, ca=d.tls.ca, cert=d.tls.cert,
                              key=d.tls.key)
    from dicom_node.tls import client_context

    tls = client_context(d.tls.ca, d.tls.cert or None, d.tls.key or None, d.tls.check_hostname) if d.tls.ca else None
    return Destination(ae_title=d.ae_title, host=d.host, port=d.port, tls=tls)
