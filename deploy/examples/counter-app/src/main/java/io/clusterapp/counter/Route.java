package io.clusterapp.counter;

import java.lang.management.ManagementFactory;
import java.util.Set;

import javax.management.MBeanServer;
import javax.management.ObjectName;

/** The jvmRoute of the Engine this web application runs in. */
final class Route {
    private static volatile String cached;

    private Route() {
    }

    /**
     * Read from the Engine MBean: it is what Tomcat appends to session ids,
     * however the server.xml set it (system property or environment).
     */
    static String jvmRoute() {
        String route = cached;
        if (route != null) {
            return route;
        }
        route = "";
        try {
            MBeanServer server = ManagementFactory.getPlatformMBeanServer();
            Set<ObjectName> engines = server.queryNames(new ObjectName("*:type=Engine"), null);
            for (ObjectName engine : engines) {
                Object value = server.getAttribute(engine, "jvmRoute");
                if (value != null) {
                    route = value.toString();
                    break;
                }
            }
        } catch (Exception e) {
            route = System.getProperty("jvmRoute", "");
        }
        cached = route;
        return route;
    }
}
