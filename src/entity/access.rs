//! Who may reach an entity type through the gateway's generic routes
//! (`/entities/{type}/{id}/{message}` and `GET /entities/{type}/{id}`).
//!
//! A type is [`GatewayAccess::Internal`] unless it says otherwise: the runtime, its own
//! handlers and the application routes that front it reach it, and the generic routes
//! answer it as an unknown type (the OpenAPI document does not list it). A public type
//! names the rule that maps a verified tenant to the ids it may touch
//! ([`TenantScope`]). A message a type sends only to itself (a timer) or only from its
//! application routes is listed in [`crate::entity::EntityProtocol::INTERNAL_MESSAGES`]:
//! the generic routes answer it as an unknown message.
//!
//! An operator (a token with the operator scope, see `gateway::auth`) reaches every type
//! and message, whatever its access.

/// Whether the gateway's generic routes reach a type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayAccess {
    /// Only the runtime, the type's own application routes and operators reach it.
    Internal,
    /// Any caller; with auth on, a tenant only the entities `scope` gives it.
    Public(TenantScope),
}

/// Which entities of a public type a verified tenant may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantScope {
    /// Those whose id is the tenant's name or starts with `<tenant>:` (tenant names hold
    /// no `:`, so no tenant's prefix is another's).
    IdPrefix,
    /// All of them: the type holds nothing of any one tenant.
    Shared,
}

/// Why a caller may not reach an entity through the generic routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessDenied {
    /// The type is internal: answered as if it did not exist.
    InternalType,
    /// The message is internal: answered as if it did not exist.
    InternalMessage,
    /// The id is outside the tenant's scope.
    OutsideTenant {
        /// The prefix the tenant's ids have.
        prefix: String,
    },
}

/// Who is calling a generic route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller<'a> {
    /// Auth is off: there are no tenants to keep apart.
    Anonymous,
    /// A verified tenant.
    Tenant(&'a str),
    /// A verified operator.
    Operator,
}

impl GatewayAccess {
    /// Whether `caller` may reach entity `id` of a type with this access (`message`, when
    /// sending one, and whether it is internal).
    pub fn check(
        self,
        caller: Caller<'_>,
        id: &str,
        internal_message: bool,
    ) -> Result<(), AccessDenied> {
        if caller == Caller::Operator {
            return Ok(());
        }
        let GatewayAccess::Public(scope) = self else {
            return Err(AccessDenied::InternalType);
        };
        if internal_message {
            return Err(AccessDenied::InternalMessage);
        }
        match (caller, scope) {
            (Caller::Tenant(tenant), TenantScope::IdPrefix) => {
                let in_scope = id == tenant
                    || id
                        .strip_prefix(tenant)
                        .is_some_and(|rest| rest.starts_with(':'));
                if in_scope {
                    Ok(())
                } else {
                    Err(AccessDenied::OutsideTenant {
                        prefix: format!("{tenant}:"),
                    })
                }
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCOPED: GatewayAccess = GatewayAccess::Public(TenantScope::IdPrefix);

    #[test]
    fn a_tenant_reaches_its_own_ids_only() {
        let beta = Caller::Tenant("beta");
        assert_eq!(SCOPED.check(beta, "beta", false), Ok(()));
        assert_eq!(SCOPED.check(beta, "beta:x", false), Ok(()));
        for other in ["acme", "acme:beta", "betax", "beta-x:y", "bet", ""] {
            assert!(
                matches!(
                    SCOPED.check(beta, other, false),
                    Err(AccessDenied::OutsideTenant { .. })
                ),
                "{other}"
            );
        }
    }

    #[test]
    fn internal_types_and_messages_are_for_operators() {
        for caller in [Caller::Anonymous, Caller::Tenant("beta")] {
            assert_eq!(
                GatewayAccess::Internal.check(caller, "beta", false),
                Err(AccessDenied::InternalType)
            );
            assert_eq!(
                SCOPED.check(caller, "beta", true),
                Err(AccessDenied::InternalMessage)
            );
        }
        assert_eq!(
            GatewayAccess::Internal.check(Caller::Operator, "acme", true),
            Ok(())
        );
        assert_eq!(
            GatewayAccess::Public(TenantScope::Shared).check(Caller::Tenant("b"), "a", false),
            Ok(())
        );
        assert_eq!(SCOPED.check(Caller::Anonymous, "anything", false), Ok(()));
    }
}
