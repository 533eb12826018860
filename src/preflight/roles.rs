//! The preflight's checks of roles and the fence: the roles applications log in as, the
//! coordinator's own role, the roles the fence cannot hold; and the order missing roles are
//! created in.

use super::*;

/// Applications must not log in as the coordinator's role: the cutover fences every role but
/// that one.
pub(super) fn check_proxy_users(c: &mut Checker, plan: &Plan) {
    for user in &plan.proxy.users {
        if user.name.0 == plan.source.url.user() || user.name.0 == plan.target.url.user() {
            c.add(
                Severity::Block,
                "proxy_user_is_coordinator",
                user.name.0.clone(),
                "a [[proxy.users]] entry is the coordinator's own role: the cutover could not fence the applications",
                Some("give the applications a role of their own".into()),
            );
        }
    }
}

pub(super) async fn check_superuser(c: &mut Checker, server: &Server) -> Result<(), PgError> {
    let row = server
        .query_one(
            "check the coordinator's role",
            // Managed services give a superuser-like role instead of superuser.
            "SELECT current_user::text, rolsuper OR EXISTS (
                 SELECT 1 FROM pg_roles g
                  WHERE g.rolname IN ('rds_superuser', 'cloudsqlsuperuser', 'azure_pg_admin')
                    AND pg_has_role(current_user, g.oid, 'MEMBER'))
               FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?;
    let (user, superuser): (String, bool) = (row.get(0), row.get(1));
    if !superuser {
        c.add(
            Severity::Block,
            "coordinator_not_superuser",
            server.side.to_string(),
            format!("role {user} is not a superuser: it cannot create subscriptions on PostgreSQL 15 nor revoke rights for the fence"),
            Some(format!("ALTER ROLE {} SUPERUSER;  -- or, on RDS, GRANT rds_superuser TO {}", sql::ident(&user), sql::ident(&user))),
        );
    }
    Ok(())
}

/// Login roles that the fence (revoking writes on the migrated tables) cannot stop: superusers,
/// members of `pg_write_all_data`, and owners of the migrated tables or members of an owner
/// role (they can `SET ROLE` to it).
pub(super) async fn unfenceable_roles(
    source: &Server,
    selection: &Selection,
) -> Result<Vec<UnfenceableRole>, PgError> {
    let owners: Vec<u32> = selection.tables.iter().map(|t| t.owner_oid).collect();
    let write_all = if source.major() >= 14 {
        "pg_has_role(r.oid, 'pg_write_all_data', 'MEMBER')"
    } else {
        "false"
    };
    let sql = format!(
        "SELECT r.rolname::text, r.rolsuper,
                NOT r.rolsuper AND {write_all},
                NOT r.rolsuper AND r.oid = ANY ($1),
                ARRAY(SELECT DISTINCT o.rolname::text FROM pg_roles o
                       WHERE o.oid = ANY ($1) AND o.oid <> r.oid AND NOT r.rolsuper AND pg_has_role(r.oid, o.oid, 'MEMBER'))
           FROM pg_roles r
          WHERE r.rolcanlogin AND r.rolname <> current_user
          ORDER BY 1"
    );
    let rows = source
        .query("list roles the cutover cannot fence", &sql, &[&owners])
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let mut reasons: Vec<String> = [
                (1, "superuser"),
                (2, "member of pg_write_all_data"),
                (3, "owns migrated tables"),
            ]
            .iter()
            .filter(|&&(i, _)| r.get::<_, bool>(i))
            .map(|&(_, why)| why.to_string())
            .collect();
            let owner_roles: Vec<String> = r.get(4);
            if !owner_roles.is_empty() {
                reasons.push(format!(
                    "can SET ROLE to table owner {}",
                    owner_roles.join(", ")
                ));
            }
            (!reasons.is_empty()).then(|| UnfenceableRole {
                role: r.get(0),
                reasons,
            })
        })
        .collect())
}

/// Orders roles so that every role comes after the roles it is a member of.
pub(super) fn order_roles(mut roles: Vec<RoleInfo>) -> Vec<RoleInfo> {
    let mut ordered: Vec<RoleInfo> = Vec::with_capacity(roles.len());
    while !roles.is_empty() {
        let placed: BTreeSet<String> = ordered.iter().map(|r| r.name.clone()).collect();
        let pending: BTreeSet<String> = roles.iter().map(|r| r.name.clone()).collect();
        let (ready, rest): (Vec<RoleInfo>, Vec<RoleInfo>) = roles.into_iter().partition(|r| {
            r.member_of
                .iter()
                .all(|g| placed.contains(g) || !pending.contains(g))
        });
        if ready.is_empty() {
            // A membership cycle cannot exist in PostgreSQL; keep the rest as they are.
            ordered.extend(rest);
            break;
        }
        ordered.extend(ready);
        roles = rest;
    }
    ordered
}
