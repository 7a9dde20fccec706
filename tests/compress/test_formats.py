"""The quantizer and storage-format contract (`format_contract.py`) over every registered quantizer."""
import pytest

from compsearch.compress.formats import FORMATS
from compsearch.compress.techniques import FACTORIZATIONS, PRUNERS, QUANTIZERS
from compsearch.registry import UnknownName
from compsearch.spaces.plan import LayerPlan, PlanError

from .format_contract import QuantizerContract


class TestRegisteredQuantizers(QuantizerContract):
    @pytest.fixture(params=QUANTIZERS.names())
    def quant_method(self, request):
        return request.param


@pytest.mark.parametrize("registry", [QUANTIZERS, PRUNERS, FACTORIZATIONS, FORMATS])
def test_an_unknown_name_is_an_error_that_lists_the_registered_ones(registry):
    with pytest.raises(UnknownName, match=f"'nope' is unknown; use one of .*{registry.names()[0]}"):
        registry.get("nope")


def test_every_quantizer_stores_in_a_registered_format():
    assert {quantizer.format for quantizer in QUANTIZERS} <= set(FORMATS.names())


def test_a_plan_naming_an_unregistered_technique_is_refused():
    with pytest.raises(PlanError, match="quant_method='nope'.*rtn"):
        LayerPlan(bits=4, quant_method="nope")
