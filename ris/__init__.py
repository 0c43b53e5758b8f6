"""Results to the RIS: HL7 v2.5.1 ORU^R01 over MLLP (hl7v2, mllp) and a FHIR R4 transaction Bundle
(fhir), after the PACS stored the DICOM results (delivery, called by worker.pipeline.deliver_job).

Configured per destination route: ``[destination.ris]`` / ``[destination.routes.X.ris]`` host,
port, tls; ``[destination.fhir]`` url, token, ca (worker/settings.py). Empty: none.
"""
