//! What a registration does to the device's twin on the hub it is assigned to, and the substatus
//! it reports: decided from where the device was and the reprovision policy alone, without I/O.

use crate::model::AssignedDeviceSubstatus;

/// What happens to the twin on the hub the device is assigned to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TwinAction {
    /// Merge the initial twin (the enrollment's, or the webhook's) into the twin: a first
    /// assignment.
    Initial,
    /// Replace the twin's tags and desired properties with the initial twin: a move that resets
    /// the device's data (anything left there from before goes).
    Reset,
    /// Copy the twin from the hub the device left (the initial twin if it had none there).
    CarryFromOldHub,
    /// Leave the twin alone: the device stays where it is.
    Leave,
}

/// Where the device was before this registration, and what its reprovision policy says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Situation {
    /// It had been assigned before.
    pub previously_assigned: bool,
    /// It is assigned to another hub than before.
    pub moved: bool,
    /// `reprovisionPolicy.migrateDeviceData`.
    pub migrate_device_data: bool,
    /// The hub is the first one it was ever assigned to.
    pub back_home: bool,
    /// The substatus it had.
    pub previous_substatus: Option<AssignedDeviceSubstatus>,
}

/// The twin action and the substatus, as Azure reports them: `initialAssignment` the first time,
/// `deviceDataMigrated` or `deviceDataReset` on a move (by the policy), and
/// `reprovisionedToInitialAssignment` on a move back to the first hub; a registration that keeps
/// its hub keeps its substatus.
pub(super) fn plan_twin(situation: Situation) -> (TwinAction, AssignedDeviceSubstatus) {
    use AssignedDeviceSubstatus as Sub;
    let moved_substatus = |otherwise| {
        if situation.back_home {
            Sub::ReprovisionedToInitialAssignment
        } else {
            otherwise
        }
    };
    match situation {
        Situation {
            previously_assigned: false,
            ..
        } => (TwinAction::Initial, Sub::InitialAssignment),
        Situation { moved: false, .. } => (
            TwinAction::Leave,
            situation
                .previous_substatus
                .unwrap_or(Sub::InitialAssignment),
        ),
        Situation {
            migrate_device_data: true,
            ..
        } => (
            TwinAction::CarryFromOldHub,
            moved_substatus(Sub::DeviceDataMigrated),
        ),
        Situation { .. } => (TwinAction::Reset, moved_substatus(Sub::DeviceDataReset)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AssignedDeviceSubstatus as Sub;

    fn situation(
        previously_assigned: bool,
        moved: bool,
        migrate: bool,
        back_home: bool,
    ) -> Situation {
        Situation {
            previously_assigned,
            moved,
            migrate_device_data: migrate,
            back_home,
            previous_substatus: Some(Sub::DeviceDataMigrated),
        }
    }

    #[test]
    fn first_assignment_writes_the_initial_twin() {
        for migrate in [true, false] {
            assert_eq!(
                plan_twin(situation(false, false, migrate, true)),
                (TwinAction::Initial, Sub::InitialAssignment)
            );
        }
    }

    #[test]
    fn staying_on_the_same_hub_leaves_the_twin_and_the_substatus() {
        assert_eq!(
            plan_twin(situation(true, false, true, false)),
            (TwinAction::Leave, Sub::DeviceDataMigrated)
        );
        let first = Situation {
            previous_substatus: None,
            ..situation(true, false, false, true)
        };
        assert_eq!(
            plan_twin(first),
            (TwinAction::Leave, Sub::InitialAssignment)
        );
    }

    #[test]
    fn a_move_migrates_or_resets_by_policy() {
        assert_eq!(
            plan_twin(situation(true, true, true, false)),
            (TwinAction::CarryFromOldHub, Sub::DeviceDataMigrated)
        );
        assert_eq!(
            plan_twin(situation(true, true, false, false)),
            (TwinAction::Reset, Sub::DeviceDataReset)
        );
    }

    #[test]
    fn a_move_back_to_the_first_hub_is_reprovisioned_to_initial_assignment() {
        assert_eq!(
            plan_twin(situation(true, true, true, true)),
            (
                TwinAction::CarryFromOldHub,
                Sub::ReprovisionedToInitialAssignment
            )
        );
        assert_eq!(
            plan_twin(situation(true, true, false, true)),
            (TwinAction::Reset, Sub::ReprovisionedToInitialAssignment)
        );
    }
}
