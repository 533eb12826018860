//! Roles on the target, created before the schema so that owners and grants restore.

use crate::pg::catalog::RoleInfo;
use crate::pg::{sql, PgError, Server};

/// The `CREATE ROLE` statement that reproduces `role`, with its password verifier if known.
pub fn create_role_sql(role: &RoleInfo) -> String {
    let mut statement = format!(
        "CREATE ROLE {} WITH {} CONNECTION LIMIT {}",
        sql::ident(&role.name),
        role.attributes.join(" "),
        role.connection_limit
    );
    if let Some(until) = &role.valid_until {
        statement.push_str(&format!(" VALID UNTIL {}", sql::literal(until)));
    }
    if let Some(verifier) = &role.password {
        statement.push_str(&format!(" PASSWORD {}", sql::literal(verifier)));
    }
    statement
}

/// Creates one role and its memberships in one transaction, so a re-run never finds the role
/// without its memberships.
pub async fn create(target: &Server, role: &RoleInfo) -> Result<(), PgError> {
    let mut statements = vec![create_role_sql(role)];
    statements.extend(
        role.member_of
            .iter()
            .map(|group| format!("GRANT {} TO {}", sql::ident(group), sql::ident(&role.name))),
    );
    target
        .execute_secret(
            &format!("create role {}", role.name),
            &statements.join(";\n"),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_statement_carries_attributes_and_verifier() {
        let role = RoleInfo {
            name: "app".into(),
            attributes: vec!["NOSUPERUSER", "LOGIN"],
            connection_limit: -1,
            valid_until: None,
            password: Some("SCRAM-SHA-256$4096:abc".into()),
            member_of: vec![],
        };
        assert_eq!(create_role_sql(&role), "CREATE ROLE \"app\" WITH NOSUPERUSER LOGIN CONNECTION LIMIT -1 PASSWORD 'SCRAM-SHA-256$4096:abc'");
    }
}
