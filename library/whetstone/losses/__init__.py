"""whetstone.losses"""

# Preference losses (one per module; see each class docstring). "X as X" marks re-exports.
from whetstone.losses.bradley_terry import BradleyTerryLoss as BradleyTerryLoss
from whetstone.losses.dpo import DPOLoss as DPOLoss
from whetstone.losses.grpo import GRPOLoss as GRPOLoss
from whetstone.losses.grpo import GRPOLossOutput as GRPOLossOutput
from whetstone.losses.grpo import group_advantages as group_advantages
from whetstone.losses.kto import KTOLoss as KTOLoss
from whetstone.losses.kto import KTOLossOutput as KTOLossOutput
from whetstone.losses.kto import kto_reference_point as kto_reference_point
from whetstone.losses.npo import NPOLoss as NPOLoss
from whetstone.losses.ns_dpo import NSDPOLoss as NSDPOLoss
from whetstone.losses.orpo import ORPOLoss as ORPOLoss
from whetstone.losses.preference_base import PreferenceLossOutput as PreferenceLossOutput
from whetstone.losses.preference_base import time_discount_weights as time_discount_weights
from whetstone.losses.preference_base import time_weight_keep_mask as time_weight_keep_mask
from whetstone.losses.simpo import SimPOLoss as SimPOLoss
