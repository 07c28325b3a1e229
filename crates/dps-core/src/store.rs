//! The storage seam, split by capability. Backends keep documents (JSON text) with an etag and
//! enforce write preconditions atomically; every rule about *when* a write is allowed lives in the
//! core. The backend contract suite lives in the `dps-store` crate.

use async_trait::async_trait;

use crate::access::ServiceIdentity;
use crate::ids::Etag;
use crate::linked_hub::LinkedHub;

/// Individual enrollments or enrollment groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EnrollmentKind {
    /// `IndividualEnrollment`.
    Individual,
    /// `EnrollmentGroup`.
    Group,
}

impl EnrollmentKind {
    /// How messages name one.
    pub fn label(self) -> &'static str {
        match self {
            Self::Individual => "enrollment",
            Self::Group => "enrollment group",
        }
    }

    /// The `x-ms-item-type` of a query over this kind.
    pub fn item_type(self) -> &'static str {
        match self {
            Self::Individual => "enrollment",
            Self::Group => "enrollmentGroup",
        }
    }
}

/// A stored document and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDoc {
    /// The version.
    pub etag: Etag,
    /// The JSON text.
    pub doc: String,
}

/// A condition checked atomically with a write or delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    /// No condition.
    None,
    /// The document must not exist (create).
    MustNotExist,
    /// The document must exist with this etag.
    EtagIs(Etag),
}

/// One page of a listing ordered by key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// The key to continue after, if more items follow.
    pub next: Option<String>,
}

/// A storage failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A `MustNotExist` write found the document.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// An `EtagIs` condition failed.
    #[error("{0} has another etag")]
    EtagMismatch(String),
    /// The document does not exist.
    #[error("{0} does not exist")]
    NotFound(String),
    /// The backend failed; the cause is for logs only.
    #[error("storage backend: {0}")]
    Backend(#[source] crate::error::Internal),
    /// The backend cannot be reached (a database server that is down or restarting): nothing was
    /// written, and the same request may succeed later.
    #[error("storage backend unavailable: {0}")]
    Unavailable(#[source] crate::error::Internal),
}

/// Enrollments and enrollment groups, keyed by lower-cased id.
#[async_trait]
pub trait EnrollmentStore: Send + Sync {
    /// Writes `doc` under `key` if `cond` holds.
    async fn put_enrollment(
        &self,
        kind: EnrollmentKind,
        key: &str,
        doc: StoredDoc,
        cond: Precondition,
    ) -> Result<(), StoreError>;
    /// Reads one.
    async fn get_enrollment(
        &self,
        kind: EnrollmentKind,
        key: &str,
    ) -> Result<Option<StoredDoc>, StoreError>;
    /// Deletes one if `cond` holds; `NotFound` if absent.
    async fn delete_enrollment(
        &self,
        kind: EnrollmentKind,
        key: &str,
        cond: Precondition,
    ) -> Result<(), StoreError>;
    /// Lists up to `limit` in key order, starting after `after`.
    async fn list_enrollments(
        &self,
        kind: EnrollmentKind,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<StoredDoc>, StoreError>;
    /// The key and current etag of every enrollment of `kind`, in key order: what a caller
    /// keeping parsed copies needs to tell which are stale, without reading the documents.
    async fn enrollment_versions(
        &self,
        kind: EnrollmentKind,
    ) -> Result<Vec<(String, Etag)>, StoreError>;
}

/// Device registration states, keyed by lower-cased registration id.
#[async_trait]
pub trait RegistrationStore: Send + Sync {
    /// Writes a registration state, remembering the group it came through (lower-cased), if any.
    async fn put_registration(
        &self,
        key: &str,
        group_key: Option<&str>,
        doc: StoredDoc,
        cond: Precondition,
    ) -> Result<(), StoreError>;
    /// Reads one.
    async fn get_registration(&self, key: &str) -> Result<Option<StoredDoc>, StoreError>;
    /// Deletes one if `cond` holds; `NotFound` if absent.
    async fn delete_registration(&self, key: &str, cond: Precondition) -> Result<(), StoreError>;
    /// Lists a group's registrations in key order.
    async fn list_registrations_by_group(
        &self,
        group_key: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<StoredDoc>, StoreError>;
}

/// Linked IoT hubs.
#[async_trait]
pub trait LinkedHubStore: Send + Sync {
    /// Adds or replaces a hub (keyed by host name).
    async fn put_linked_hub(&self, hub: &LinkedHub) -> Result<(), StoreError>;
    /// All hubs, ordered by host name.
    async fn list_linked_hubs(&self) -> Result<Vec<LinkedHub>, StoreError>;
    /// Removes a hub; `NotFound` if absent.
    async fn delete_linked_hub(&self, host_name: &str) -> Result<(), StoreError>;
}

/// CA certificates uploaded to the service (Azure keeps them on the DPS resource), keyed by
/// lower-cased name.
#[async_trait]
pub trait CertificateStore: Send + Sync {
    /// Writes one if `cond` holds.
    async fn put_certificate(
        &self,
        key: &str,
        doc: StoredDoc,
        cond: Precondition,
    ) -> Result<(), StoreError>;
    /// Reads one.
    async fn get_certificate(&self, key: &str) -> Result<Option<StoredDoc>, StoreError>;
    /// All of them, in key order.
    async fn list_certificates(&self) -> Result<Vec<StoredDoc>, StoreError>;
    /// Deletes one if `cond` holds; `NotFound` if absent.
    async fn delete_certificate(&self, key: &str, cond: Precondition) -> Result<(), StoreError>;
}

/// The service identity (ID scope, policies), created once.
#[async_trait]
pub trait IdentityStore: Send + Sync {
    /// Stores `candidate` unless an identity exists; returns the stored one either way.
    async fn init_identity(
        &self,
        candidate: &ServiceIdentity,
    ) -> Result<ServiceIdentity, StoreError>;
    /// The stored identity, if any.
    async fn identity(&self) -> Result<Option<ServiceIdentity>, StoreError>;
}

/// A registration operation as stored: the columns the worker selects on, and the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredOperation {
    /// Operation id.
    pub operation_id: String,
    /// Lower-cased registration id.
    pub registration_key: String,
    /// True until the operation reaches a terminal state.
    pub pending: bool,
    /// When the worker may next work on it (unix milliseconds).
    pub next_attempt_ms: i64,
    /// The JSON document.
    pub doc: String,
}

/// When a write must be on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Before the call returns.
    Now,
    /// By the store's next durable write: what nobody has been told of yet may be lost
    /// in a crash. A backend may make it durable at once.
    Deferred,
}

/// Who holds an operation's lease: a node (stable across restarts) in one incarnation (one process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseOwner {
    /// The node's stable name.
    pub node: String,
    /// This run of it.
    pub incarnation: String,
}

impl LeaseOwner {
    /// `node` in a fresh incarnation.
    pub fn new(node: impl Into<String>) -> Self {
        let mut bytes = [0u8; 8];
        crate::sas::fill_random(&mut bytes);
        Self {
            node: node.into(),
            incarnation: bytes.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }
}

/// Durable registration operations, claimed by workers with leases so that any node can finish what
/// another started.
#[async_trait]
pub trait OperationStore: Send + Sync {
    /// Inserts or replaces an operation and releases any lease on it.
    async fn put_operation(&self, op: &StoredOperation) -> Result<(), StoreError>;
    /// Inserts a new operation already leased to `owner` until `until_ms`, for the node that records
    /// it to work on it at once without claiming it; should that node stop first, the lease runs
    /// out and the operation is claimed as any other. Returns the device's registration state as
    /// it was when the operation was written (read with it: the worker needs it next). With
    /// [`Durability::Deferred`] the operation is committed (every reader sees it) but may reach
    /// the disk only with the next durable write or [`OperationStore::make_durable`].
    async fn put_leased_operation(
        &self,
        op: &StoredOperation,
        owner: &LeaseOwner,
        until_ms: i64,
        durability: Durability,
    ) -> Result<Option<StoredDoc>, StoreError>;
    /// Makes the operation `operation_id` durable, and with it every write committed before it
    /// ([`Durability::Deferred`] ones included).
    async fn make_durable(&self, operation_id: &str) -> Result<(), StoreError>;
    /// Reads one.
    async fn get_operation(
        &self,
        operation_id: &str,
    ) -> Result<Option<StoredOperation>, StoreError>;
    /// Leases up to `limit` pending operations that are due at `now_ms`, oldest first, to `owner`
    /// until `now_ms + lease_ms`. An operation is free when it was never leased, its lease expired,
    /// or an earlier incarnation of the same node holds it: a node restarted under the same name
    /// resumes at once what it held when it died. Leases of `owner` itself are never returned again,
    /// so a worker can claim more while it still works on what it claimed before.
    async fn claim_operations(
        &self,
        owner: &LeaseOwner,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<StoredOperation>, StoreError>;
    /// Extends `owner`'s lease on `operation_id` to `until_ms`, while the operation is pending and
    /// the lease is still `owner`'s (this incarnation's); whether it was. A worker renews the
    /// leases of the operations it works on, so that no other node takes one over while it is in
    /// progress, however long its hub and webhook calls take.
    async fn renew_lease(
        &self,
        owner: &LeaseOwner,
        operation_id: &str,
        until_ms: i64,
    ) -> Result<bool, StoreError>;
    /// Writes a device's registration state (under `cond`, as
    /// [`RegistrationStore::put_registration`]) and an operation (as
    /// [`OperationStore::put_operation`]) together, in one transaction: both or neither.
    async fn put_registration_and_operation(
        &self,
        key: &str,
        group_key: Option<&str>,
        doc: StoredDoc,
        cond: Precondition,
        op: &StoredOperation,
    ) -> Result<(), StoreError>;
    /// Deletes up to `limit` finished operations last written before `before_ms`; returns how many
    /// (fewer than `limit`: none are left to prune).
    async fn prune_operations(&self, before_ms: i64, limit: usize) -> Result<usize, StoreError>;
}

/// Everything a backend provides.
pub trait Store:
    EnrollmentStore
    + RegistrationStore
    + LinkedHubStore
    + IdentityStore
    + OperationStore
    + CertificateStore
{
}

impl<
    T: EnrollmentStore
        + RegistrationStore
        + LinkedHubStore
        + IdentityStore
        + OperationStore
        + CertificateStore,
> Store for T
{
}
