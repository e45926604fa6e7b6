"""C.7: both flavours serve A.7's metadata -- the service document at the OData root and a
CSDL XML $metadata built from the instance's entities (Namespace and Alias, BaseType chains,
composite keys, every Edm type, complex and collection properties, navigation properties)."""

import json
import xml.etree.ElementTree as ET

import pytest

from emulator_client import Emulator, INSTANCE_ID

EDMX = "{http://docs.oasis-open.org/odata/ns/edmx}"
EDM = "{http://docs.oasis-open.org/odata/ns/edm}"

TYPES = ["Edm.String", "Edm.Boolean", "Edm.Byte", "Edm.SByte", "Edm.Int16", "Edm.Int32",
         "Edm.Int64", "Edm.Single", "Edm.Double", "Edm.Decimal", "Edm.DateTimeOffset",
         "Edm.Date", "Edm.TimeOfDay", "Edm.Duration", "Edm.Guid", "Edm.Binary"]


def setup_entities(emu):
    emu.set_entity("Party", {"attributes": [{"name": "PartyId", "dataType": "Edm.Guid"},
                                            {"name": "Name", "dataType": "Edm.String"}],
                             "keys": [["PartyId"]], "entitySet": "parties"})
    emu.set_entity("Person", {"baseEntity": "Party", "entitySet": "people",
                              "attributes": [{"name": "PartyId", "dataType": "Edm.Guid"},
                                             {"name": "Name", "dataType": "Edm.String"},
                                             {"name": "_managerid_value", "dataType": "Edm.Guid"},
                                             {"name": "Home", "dataType": "Address"},
                                             {"name": "Tags", "dataType": "Collection(Edm.String)"},
                                             {"name": "Nick", "dataType": "Edm.String",
                                              "nullable": False}],
                              "keys": [["PartyId"]]})
    emu.set_entity("Sampler", {"attributes": [{"name": "P%d" % i, "dataType": t}
                                              for i, t in enumerate(TYPES)],
                               "keys": [["P0", "P5"]], "entitySet": "samplers"})


@pytest.fixture(scope="module", params=["customer_insights", "dataverse"])
def flavored(request):
    with Emulator("--flavor", request.param) as emu:
        setup_entities(emu)
        yield request.param, emu


def root_path(flavor):
    return "/api/data/v9.2" if flavor == "dataverse" else "/v1/instances/%s/data" % INSTANCE_ID


def metadata(flavor, emu):
    status, headers, body = emu.request("GET", root_path(flavor) + "/$metadata",
                                        headers={"Accept": "application/xml"})
    assert status == 200
    assert "xml" in {k.lower(): v for k, v in headers.items()}["content-type"]
    return ET.fromstring(body)


def test_service_document(flavored):
    flavor, emu = flavored
    status, _, body = emu.request("GET", root_path(flavor) + "/")
    assert status == 200
    doc = json.loads(body)
    assert doc["@odata.context"].endswith("/$metadata")
    entries = {e["name"]: e for e in doc["value"]}
    want = {"parties", "people", "samplers"} if flavor == "dataverse" else \
        {"Party", "Person", "Sampler"}
    assert want <= set(entries)
    assert all(e["kind"] == "EntitySet" and e["url"] == e["name"] for e in doc["value"])


def test_schema_namespace_alias_and_container(flavored):
    flavor, emu = flavored
    root = metadata(flavor, emu)
    assert root.tag == EDMX + "Edmx" and root.get("Version") == "4.0"
    schema = root.find(EDMX + "DataServices/" + EDM + "Schema")
    ns, alias = ("Microsoft.Dynamics.CRM", "mscrm") if flavor == "dataverse" else \
        ("Microsoft.Dynamics.CI", "ci")
    assert (schema.get("Namespace"), schema.get("Alias")) == (ns, alias)
    ref = alias if flavor == "dataverse" else ns
    sets = {s.get("Name"): s.get("EntityType")
            for s in schema.find(EDM + "EntityContainer").findall(EDM + "EntitySet")}
    person = "person" if flavor == "dataverse" else "Person"
    assert sets["people" if flavor == "dataverse" else "Person"] == "%s.%s" % (ref, person)


def types_of(root):
    schema = root.find(EDMX + "DataServices/" + EDM + "Schema")
    return schema, {t.get("Name"): t for t in schema.findall(EDM + "EntityType")}


def test_base_type_chain_and_inherited_key(flavored):
    flavor, emu = flavored
    schema, types = types_of(metadata(flavor, emu))
    person = types["person" if flavor == "dataverse" else "Person"]
    party = types["party" if flavor == "dataverse" else "Party"]
    ref = "mscrm" if flavor == "dataverse" else "Microsoft.Dynamics.CI"
    assert person.get("BaseType") == "%s.%s" % (ref, party.get("Name"))
    assert person.find(EDM + "Key") is None                 # inherited from the base
    assert [p.get("Name") for p in party.find(EDM + "Key")] == ["PartyId"]
    assert [p.get("Name") for p in person.findall(EDM + "Property")] == \
        ["_managerid_value", "Home", "Tags", "Nick"]
    if flavor == "dataverse":
        assert party.get("BaseType") == "mscrm.crmbaseentity"
        assert types["crmbaseentity"].get("Abstract") == "true"
        assert [n.get("Name") for n in person.findall(EDM + "NavigationProperty")] == ["managerid"]


def test_every_edm_type_complex_collection_nullable_composite_key(flavored):
    flavor, emu = flavored
    schema, types = types_of(metadata(flavor, emu))
    sampler = types["sampler" if flavor == "dataverse" else "Sampler"]
    assert [p.get("Type") for p in sampler.findall(EDM + "Property")] == TYPES
    assert [p.get("Name") for p in sampler.find(EDM + "Key")] == ["P0", "P5"]
    person = {p.get("Name"): p for p in
              types["person" if flavor == "dataverse" else "Person"].findall(EDM + "Property")}
    ref = "mscrm" if flavor == "dataverse" else "Microsoft.Dynamics.CI"
    assert person["Home"].get("Type") == ref + ".Address"
    assert person["Tags"].get("Type") == "Collection(Edm.String)"
    assert person["Nick"].get("Nullable") == "false"
    assert person["Tags"].get("Nullable") is None
    assert [c.get("Name") for c in schema.findall(EDM + "ComplexType")] == ["Address"]
