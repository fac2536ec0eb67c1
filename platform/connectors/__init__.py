"""Connectors read one kind of member file (sensor recording, table, image, CAD drawing,
document) into plain arrays and strings, and turn bad input into a UserError that names the
file. Modules are imported one by one (`from indai.platform.connectors import images`) so that
reading a CSV does not pull in ezdxf or matplotlib."""
