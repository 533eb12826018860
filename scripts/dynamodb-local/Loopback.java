// Starts AWS's DynamoDB Local on 127.0.0.1 only.
//
// Its own command line (`java -jar DynamoDBLocal.jar -port N`) listens on every interface and
// has no option to choose one; the tests must not listen beyond loopback. This builds the same
// server from the same arguments, moves its Jetty connectors to 127.0.0.1 before they open,
// and starts it. Telemetry is always off (`-disableTelemetry`): nothing leaves the machine.
//
//   java -cp DynamoDBLocal.jar:. -Djava.library.path=DynamoDBLocal_lib Loopback -inMemory -port N

import java.lang.reflect.Field;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;

import org.eclipse.jetty.server.Connector;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import software.amazon.dynamodb.services.local.main.ServerRunner;
import software.amazon.dynamodb.services.local.server.DynamoDBProxyServer;

public class Loopback {
    public static void main(String[] args) throws Exception {
        List<String> all = new ArrayList<>(Arrays.asList(args));
        if (!all.contains("-disableTelemetry")) {
            all.add("-disableTelemetry");
        }
        DynamoDBProxyServer proxy = ServerRunner.createServerFromCommandLineArgs(all.toArray(new String[0]));
        Field field = DynamoDBProxyServer.class.getDeclaredField("server");
        field.setAccessible(true);
        Server jetty = (Server) field.get(proxy);
        for (Connector connector : jetty.getConnectors()) {
            ((ServerConnector) connector).setHost("127.0.0.1");
        }
        proxy.start();
        System.out.println("DynamoDB Local listening on 127.0.0.1");
        proxy.join();
    }
}
