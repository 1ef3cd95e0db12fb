"""From a scan to a report for a person: grounding in the measurements, and the web page."""
