"""The composition root (worker/node.py): settings become the node's parts in one place, with one
clock and one spool layout; the tasks get the settings object itself (the product never imports bench: test_import_graph.py)."""

from __future__ import annotations

import dataclasses
import datetime as dt

from dicom_node.jobstore import JobState
from dicom_node.layout import SpoolLayout
from dicom_node.listener import ListenerConfig
from worker.clock import ManualClock
from worker.node import Node
from worker.settings import Settings, load_settings


def test_the_listener_config_is_the_node_section(tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[paths]\nspool = "{tmp_path / "var"}"\n[node]\nae_title = "SITE"\nport = 4104\n'
                   'allowed_calling_aets = ["CR1"]\nmax_associations = 3\nmax_pdu_length = 1048576\n'
                   'association_request_timeout_s = 2.5\nlookup_secret = "s3cret"\n')
    listener = Node(load_settings(cfg)).listener_config(host="127.0.0.1")
    assert (listener.ae_title, listener.host, listener.port) == ("SITE", "127.0.0.1", 4104)
    assert listener.allowed_calling_aets == ("CR1",) and listener.max_associations == 3
    assert listener.max_pdu_length == 2**20 and listener.association_request_timeout == 2.5
    assert listener.lookup_key == b"s3cret" and listener.tls is None
    # [node]'s defaults live in the settings only: the listener's config repeats none of them.
    node_fields = {"ae_title", "host", "port", "allowed_calling_aets", "allowed_addresses", "max_associations",
                   "max_associations_per_address", "max_pending_per_address", "max_pending",
                   "association_request_timeout", "max_pdu_length"}
    for f in dataclasses.fields(ListenerConfig):
        if f.name in node_fields:
            assert f.default is dataclasses.MISSING, f"ListenerConfig.{f.name} repeats a [node] default"


def test_every_part_runs_on_one_clock_and_one_layout(tmp_path):
    clock = ManualClock(dt.datetime(2026, 12, 2, 8, 0, tzinfo=dt.UTC))
    node = Node(Settings(paths={"spool": str(tmp_path / "var")}), clock=clock)
    layout = SpoolLayout((tmp_path / "var").resolve())
    assert node.layout == layout
    assert node.jobs.path == layout.jobs and node.audit.path == layout.audit and node.pauses.folder == layout.paused
    assert (node.spool.incoming, node.spool.results, node.spool.dead, node.spool.quarantine_dir, node.spool.tmp) == (
        layout.incoming, layout.results, layout.dead_letter, layout.quarantine, layout.tmp)
    job, _ = node.jobs.add(job_id="j1", sop_instance_uid="1.2", sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                           study_instance_uid="1.3", calling_aet="CR1", path="incoming/j1.dcm", state=JobState.QUEUED)
    node.audit.record("received", job_id="j1")
    ctx = node.context()
    assert ctx.clock is clock and ctx.jobs is node.jobs and ctx.audit is node.audit and ctx.spool is node.spool
    assert job.created_at == clock.t and [r["time"] for r in node.audit.read()] == [round(clock.t, 3)]
    clock.advance(5)
    assert ctx.clock.now() == dt.datetime(2026, 12, 2, 8, 0, 5, tzinfo=dt.UTC)


def test_a_route_and_the_default_destination(tmp_path):
    node = Node(Settings(paths={"spool": str(tmp_path)}, destination={
        "ae_title": "PACS", "port": 104, "routes": {"CR2": {"ae_title": "OTHER", "host": "10.0.0.2", "port": 11112}}}))
    assert [(c, str(d)) for c, d in node.destinations()] == [("", "PACS@127.0.0.1:104"),
                                                             ("CR2", "OTHER@10.0.0.2:11112")]
    assert str(node.destination_for("CR2")) == "OTHER@10.0.0.2:11112"
    assert str(node.destination_for("CR1")) == "PACS@127.0.0.1:104"


def test_the_tasks_take_the_settings_object_not_json(tmp_path):
    import worker.tasks as tasks
    from worker.app import broker_options, make_app

    settings = Settings(paths={"spool": str(tmp_path / "var")})
    app = make_app(settings)
    assert "medsam2_settings" not in app.conf and app.medsam2_settings is settings
    app.set_current()  # as in a worker process: the tasks look their app up as current_app
    first = tasks._runtime()
    assert first is tasks._runtime() and first.settings is settings  # made once per process
    _, options = broker_options(settings)
    assert options["data_folder_in"] == str(settings.layout.broker_folder("queue"))


def test_shadow_mode_sends_no_discrepancy_notification(tmp_path):
    """[node] mode = "shadow" keeps everything inside the node: the second reader still compares,
    lists, audits and counts, but its HL7 or webhook notification is not sent."""
    def reader(mode: str):
        return Node(Settings.model_validate({
            "paths": {"spool": str(tmp_path / mode)}, "node": {"mode": mode},
            "second_read": {"enabled": True, "notify": {"webhook_url": "http://127.0.0.1:9/hook"}}})).second_reader()

    assert reader("live").notify is not None
    assert reader("shadow").notify is None


def test_an_amqp_broker_gets_quorum_queues_confirms_and_persistent_messages(tmp_path):
    """RabbitMQ is the durable broker: gpu and io are declared as durable quorum queues, a
    publish waits for the broker's confirm, messages are persistent. Redis keeps its visibility
    timeout and none of these (they are AMQP's)."""
    from worker.app import broker_options, make_app

    for scheme in ("amqp", "pyamqp"):
        settings = Settings(paths={"spool": str(tmp_path)}, broker={"url": f"{scheme}://guest:guest@mq:5672//"})
        url, options = broker_options(settings)
        assert url.startswith(scheme) and options == {"confirm_publish": True}
        conf = make_app(settings).conf
        queues = {q.name: q for q in conf.task_queues}
        assert set(queues) == {"gpu", "io"}
        assert all(q.durable and q.queue_arguments == {"x-queue-type": "quorum"} for q in queues.values())
        assert {(q.exchange.name, q.exchange.type, q.routing_key) for q in queues.values()} == {
            ("medsam2", "topic", "gpu"), ("medsam2", "topic", "io")}
        assert conf.task_default_delivery_mode == "persistent" and conf.task_default_queue_type == "quorum"
    redis = Settings(paths={"spool": str(tmp_path)}, broker={"url": "redis://127.0.0.1:6379/0"})
    assert broker_options(redis)[1] == {"visibility_timeout": 3600}
    assert make_app(redis).conf.task_queues is None
